"""PRM tokens and time per search, full recomputation against the incremental KV cache (``incremental=True``).

A step-level search calls the PRM with every candidate's whole step list at every step; the full path runs
all of it again (O(steps^2) tokens), the incremental one only the new steps after each candidate's cached
prefix. This runs ``beam_search`` and ``particle_filter`` with the simulated generator
(:mod:`fastsearch.models.reasoning`: no LM, so the time measured is the PRM's) and tiny random PRMs of
each format (Math-Shepherd on a Llama causal LM, Qwen2.5-Math-PRM on a Qwen2 token classifier) over a
character-level tokenizer, and prints medians over repeats.

    python benchmarks/prm_incremental.py [--hidden 64] [--layers 2] [--problems 4] [--n 8] [--steps 8]
"""

from __future__ import annotations

import argparse
import statistics
import time
import zlib

import torch

from fastsearch.integrations.prms import QwenMathPRM
from fastsearch.integrations.transformers import HFProcessRewardModel
from fastsearch.models import reasoning
from fastsearch.search import beam_search, particle_filter

SPECIALS = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>", "<extra_0>"]
QWEN_TEMPLATE = ("{%- for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
                 "{%- endfor %}")


def char_tokenizer():
    import tokenizers
    import transformers

    vocab = {token: index for index, token in enumerate(SPECIALS)}
    for code in [10] + list(range(32, 127)):
        vocab[chr(code)] = len(vocab)
    core = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = tokenizers.pre_tokenizers.Split(tokenizers.Regex(r"[\s\S]"), behavior="isolated")
    core.add_special_tokens(SPECIALS)
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>")
    tokenizer.chat_template = QWEN_TEMPLATE
    return tokenizer


def models(tokenizer, hidden: int, layers: int):
    import transformers

    shape = dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192, pad_token_id=0)
    torch.manual_seed(0)
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(**shape)).eval()
    qwen = transformers.Qwen2ForTokenClassification(transformers.Qwen2Config(num_labels=2, **shape)).eval()
    return {
        "math_shepherd": lambda incremental, batch: HFProcessRewardModel(
            llama, tokenizer, "<extra_0>", "+", "-", batch_size=batch, incremental=incremental),
        "qwen": lambda incremental, batch: QwenMathPRM(qwen, tokenizer, batch_size=batch, incremental=incremental),
    }


class LongerSteps:
    """The simulated generator with each step lengthened to 12-80 characters of filler (one token each with
    the character tokenizer, the simulation's own range of tokens per step): its steps alone are ~25
    characters, far shorter than a real model's."""

    def __init__(self, delimiter: str = "\n\n"):
        self.inner, self.delimiter = reasoning.SimulatedGenerator(), delimiter

    def _lengthen(self, text: str) -> str:
        pieces = text.split(self.delimiter)
        return self.delimiter.join(piece + " " + "." * (12 + zlib.crc32(piece.encode()) % 69) if piece else piece
                                   for piece in pieces[:-1]) + self.delimiter + pieces[-1] if len(pieces) > 1 else text

    def generate(self, prompts, **options):
        return [[completion._replace(text=self._lengthen(completion.text)) for completion in samples]
                for samples in self.inner.generate(prompts, **options)]


def one_search(algorithm, problems, prm, args):
    generator = LongerSteps()
    began = time.perf_counter()
    if algorithm == "beam_search":
        result = beam_search(problems, generator, prm, n=args.n, beam_width=args.beam_width, max_steps=args.steps,
                             answer_fn=reasoning.extract_answer, seed=1)
    else:
        result = particle_filter(problems, generator, prm, n=args.n, max_steps=args.steps, ess_threshold=0.8,
                                 answer_fn=reasoning.extract_answer, seed=1)
    return result, time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--problems", type=int, default=4)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--beam-width", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    problems = [p.text for p in reasoning.make_problems(args.problems, seed=0)]
    makers = models(char_tokenizer(), args.hidden, args.layers)
    print(f"# hidden={args.hidden} layers={args.layers} problems={args.problems} n={args.n} "
          f"beam_width={args.beam_width} steps={args.steps} batch_size={args.batch_size} threads={args.threads}; "
          f"medians of {args.repeats}")
    print(f"{'format':14} {'search':16} {'mode':12} {'PRM tokens':>11} {'padded':>9} {'holes':>8} {'passes':>7} "
          f"{'PRM s':>8} {'search s':>9} {'calls':>6} {'same pick':>9}")
    for form, make in makers.items():
        for algorithm in ("beam_search", "particle_filter"):
            picks = {}
            rows = {}
            for mode in ("full", "incremental"):
                samples = []
                for _ in range(args.repeats):
                    prm = make(mode == "incremental", args.batch_size)
                    result, wall = one_search(algorithm, problems, prm, args)
                    samples.append((prm.tokens_processed, prm.padded_tokens, prm.past_holes, prm.forward_passes,
                                    result.spent.verifier_seconds, wall, result.spent.verifier_calls))
                    picks[mode] = result.completions
                rows[mode] = [statistics.median(column) for column in zip(*samples, strict=True)]
            same = "yes" if picks["full"] == picks["incremental"] else "no"
            for mode, (tokens, padded, holes, passes, prm_s, wall, calls) in rows.items():
                print(f"{form:14} {algorithm:16} {mode:12} {tokens:11.0f} {padded:9.0f} {holes:8.0f} {passes:7.0f} "
                      f"{prm_s:8.3f} {wall:9.3f} {calls:6.0f} {same:>9}")
            full, inc = rows["full"], rows["incremental"]
            print(f"{'':14} {'':16} {'ratio':12} {full[0] / inc[0]:10.1f}x {full[1] / inc[1]:8.1f}x {'':8} {'':7} "
                  f"{full[4] / inc[4]:7.1f}x {full[5] / inc[5]:8.1f}x")


if __name__ == "__main__":
    main()
