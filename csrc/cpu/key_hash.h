// Hashing of int64 keys: sequence_keys' hash of a token sequence (csrc/README.md, "Selection ops"), and the
// table that groups equal keys (beam_prune's dedup keys, vote's answers) by a small open-addressing table.
//
// Its code lives in the inline namespace CPU_CAPABILITY, named per capability build (csrc/README.md, "Layout").
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace fastsearch::cpu {
inline namespace CPU_CAPABILITY {

// The splitmix64 finaliser (sequence keys, and the key tables' slot choice).
inline uint64_t mix64(uint64_t z) {
  z ^= z >> 30;
  z *= 0xBF58476D1CE4E5B9ull;
  z ^= z >> 27;
  z *= 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

constexpr uint64_t kTokenMultiplier = 0x9E3779B97F4A7C15ull;
constexpr uint64_t kPositionMultiplier = 0xC2B2AE3D27D4EB4Full;

// The key of the token sequence tokens[0, size): mix(len ^ sum_p mix(token_p * A + p * B + 1)), in wrapping
// uint64 arithmetic, each token sign-extended to int64 first.
template <typename Token>
int64_t sequence_key(const Token* tokens, int64_t size) {
  uint64_t sum = 0;
  for (int64_t position = 0; position < size; ++position) {
    const uint64_t token = static_cast<uint64_t>(static_cast<int64_t>(tokens[position]));
    sum += mix64(token * kTokenMultiplier + static_cast<uint64_t>(position) * kPositionMultiplier + 1);
  }
  return static_cast<int64_t>(mix64(static_cast<uint64_t>(size) ^ sum));
}

// Dense ids 0, 1, 2, ... for the distinct int64 keys of one group, in order of first appearance: an
// open-addressing table at most half full, emptied per group.
class KeyIds {
 public:
  // Empties the table for at most `capacity` distinct keys.
  void reset(int64_t capacity) {
    size_t slots = 16;
    while (slots < 2 * static_cast<size_t>(capacity)) slots *= 2;
    ids_.assign(slots, kEmpty);
    keys_.resize(slots);
    mask_ = slots - 1;
    distinct_ = 0;
  }

  // The id of `key`; a key not seen before gets the next id (the number of keys seen so far).
  int64_t id(int64_t key) {
    for (size_t slot = mix64(static_cast<uint64_t>(key)) & mask_;; slot = (slot + 1) & mask_) {
      if (ids_[slot] == kEmpty) {
        keys_[slot] = key;
        ids_[slot] = distinct_;
        return distinct_++;
      }
      if (keys_[slot] == key) return ids_[slot];
    }
  }

 private:
  static constexpr int64_t kEmpty = -1;
  std::vector<int64_t> keys_;
  std::vector<int64_t> ids_;
  size_t mask_ = 0;
  int64_t distinct_ = 0;
};

}  // namespace CPU_CAPABILITY
}  // namespace fastsearch::cpu
