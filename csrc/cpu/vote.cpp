// CPU kernels of the answer ops: voting among candidates and hashing token sequences into answer keys.
// Semantics: csrc/README.md ("Selection ops"); oracle: fastsearch/ops/vote.py.
//
// Equal answer keys are grouped by key_hash.h's table; scores are compared in fp32 as in the reference and
// summed in candidate order, so every capability build gives the same bits.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch_v2.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

#include "common/select_checks.h"
#include "cpu/groups.h"
#include "cpu/key_hash.h"
#include "cpu/rank_keys.h"
#include "cpu/tensor_args.h"

namespace fastsearch::cpu {
namespace {

// -- vote ------------------------------------------------------------------------------------------------

// One answer's tally.
struct Answer {
  int64_t first;  // its first voter
  int64_t last;   // its last voter: where its count is reached
  int64_t count;
  float sum;  // of its voters' scores, in candidate order (weighted mode)
};

struct VoteScratch {
  std::vector<float> scores;  // the group's, as fp32
  std::vector<Answer> answers;  // indexed by answer-key id, so in order of first voter
  KeyIds key_ids;
};

// The winning answer's first voter in one group (local index), or -1 without voters. Scores are fp32 as
// in the reference; `scores` holds them for this group, or is null (majority without scores).
int64_t group_winner(const int64_t* keys, const float* scores, const uint8_t* mask, int64_t size, int64_t mode,
                     VoteScratch& s) {
  const auto votes = [&](int64_t local) {
    return (mask == nullptr || mask[local]) && (mode == 0 || !std::isnan(scores[local]));
  };
  if (mode == 2) {  // max: the best single score, then its answer's first voter
    RankCode<float> best = kUnselectable<RankCode<float>>;
    for (int64_t local = 0; local < size; ++local) {
      if (votes(local)) best = std::min(best, rank_code(scores[local], local));
    }
    if (best == kUnselectable<RankCode<float>>) return -1;
    const int64_t top = local_of(best);
    for (int64_t local = 0; local < top; ++local) {
      if (votes(local) && keys[local] == keys[top]) return local;
    }
    return top;
  }
  Answer* answers = room_for(s.answers, size);
  s.key_ids.reset(size);
  int64_t distinct = 0;
  for (int64_t local = 0; local < size; ++local) {
    if (!votes(local)) continue;
    const int64_t id = s.key_ids.id(keys[local]);
    if (id == distinct) answers[distinct++] = Answer{local, local, 0, 0.0f};
    Answer& answer = answers[id];
    answer.last = local;
    ++answer.count;
    if (mode == 1) answer.sum += scores[local];
  }
  if (distinct == 0) return -1;
  // Answers are in order of their first voter, so keeping the incumbent on a tie keeps the earlier one.
  const Answer* winner = answers;
  for (int64_t id = 1; id < distinct; ++id) {
    const Answer& answer = answers[id];
    const bool better =
        mode == 0 ? answer.count > winner->count || (answer.count == winner->count && answer.last < winner->last)
                  : answer.sum > winner->sum || (std::isnan(winner->sum) && !std::isnan(answer.sum));
    if (better) winner = &answer;
  }
  return winner->first;
}

at::Tensor vote(const at::Tensor& answer_keys, const std::optional<at::Tensor>& scores,
                const std::optional<at::Tensor>& offsets, const std::optional<at::Tensor>& mask, int64_t mode) {
  check_vote_args(answer_keys, scores, offsets, mask, mode);
  const Contiguous keys = answer_keys.expect_contiguous();
  const Contiguous score_values = contiguous_or_none(scores);
  const Contiguous bounds = contiguous_or_none(offsets);
  const Contiguous voters = contiguous_or_none(mask);
  const Groups groups = groups_of(*keys, *bounds);
  at::Tensor winners = empty_output({groups.count}, at::kLong);
  const int64_t* key_data = keys->const_data_ptr<int64_t>();
  const uint8_t* mask_data = flags_or_null(voters);
  int64_t* winners_out = winners.mutable_data_ptr<int64_t>();

  for_each_group(groups, {5.0, 10.0}, [&](int64_t group, int64_t begin, int64_t size) {
    VoteScratch& s = thread_scratch<VoteScratch>();
    const float* group_scores = nullptr;
    if (mode != 0) {  // majority ignores scores
      float* converted = room_for(s.scores, size);
      to_float(score_values->scalar_type(), score_values->const_data_ptr(), begin, size, converted);
      group_scores = converted;
    }
    const int64_t winner = group_winner(key_data + begin, group_scores,
                                        mask_data == nullptr ? nullptr : mask_data + begin, size, mode, s);
    winners_out[group] = winner < 0 ? -1 : groups.reported(begin, winner);
  });
  return winners;
}

// -- sequence_keys ---------------------------------------------------------------------------------------

at::Tensor sequence_keys(const at::Tensor& token_ids, const at::Tensor& offsets) {
  check_sequence_keys_args(token_ids, offsets);
  const Contiguous tokens = token_ids.expect_contiguous();
  const Contiguous bounds = offsets.expect_contiguous();
  const Groups groups = groups_of(*tokens, *bounds);
  at::Tensor keys = empty_output({groups.count}, at::kLong);
  int64_t* keys_out = keys.mutable_data_ptr<int64_t>();

  AT_DISPATCH_V2(tokens->scalar_type(), "sequence_keys", AT_WRAP([&] {
    const scalar_t* token_data = tokens->const_data_ptr<scalar_t>();
    for_each_group(groups, {1.0, 10.0}, [&](int64_t group, int64_t begin, int64_t size) {
      keys_out[group] = sequence_key(token_data + begin, size);
    });
  }), at::kLong, at::kInt);
  return keys;
}

}  // namespace
}  // namespace fastsearch::cpu

TORCH_LIBRARY_IMPL(fastsearch, CPU, m) {
  m.impl("vote", &fastsearch::cpu::vote);
  m.impl("sequence_keys", &fastsearch::cpu::sequence_keys);
}
