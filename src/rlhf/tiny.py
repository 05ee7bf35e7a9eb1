"""Tiny random models for tests and smoke runs, built locally in about a second.

`build_tiny` writes a normal HF causal-LM dir: a byte-level BPE tokenizer (vocab ~1000) trained on a
built-in deterministic corpus, the training-compatible ChatML template, and a random 2-layer Llama in
safetensors. `build_tiny_reward` writes the same backbone as a 1-label sequence classifier. Nothing here
reads repo files or the network, so the package can build its fixtures anywhere.

Special tokens (same ids in every build): `<|endoftext|>` = 0 (pad and unk), `<|im_start|>` = 1 (bos),
`<|im_end|>` = 2 (eos). Pad differs from eos, as `rlhf.models` makes it for every tokenizer (why:
`rlhf.models.tokens`). The template and token strings come from `rlhf.templates`; nothing here imports
`rlhf.models`, which builds its `tiny-random` alias with `build_tiny`.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import torch

from rlhf import templates

PAD, BOS, EOS = templates.ENDOFTEXT, templates.IM_START, templates.IM_END

_SUBJECTS = ("the cat", "a small dog", "my neighbour", "the teacher", "our team", "a curious child",
             "the old farmer", "this model", "the river", "every student", "the pilot", "a quiet robot")
_VERBS = ("reads", "writes", "builds", "paints", "carries", "explains", "finds", "watches", "cooks",
          "measures", "follows", "answers", "remembers", "repairs")
_OBJECTS = ("a long letter", "the blue house", "three apples", "the mountain road", "a simple question",
            "the weather report", "an old bicycle", "the green garden", "a warm bread", "the night sky",
            "forty books", "the broken clock", "a helpful answer", "the history lesson")
_PLACES = ("in the morning", "near the station", "after dinner", "before the storm", "on Monday",
           "at the library", "under the bridge", "during winter", "beside the lake", "in Paris",
           "across the valley", "at noon")
_QUESTIONS = ("What is the capital of France?", "How do plants grow?", "Why is the sky blue?",
              "Can you explain gravity?", "Where do penguins live?", "Who wrote this poem?",
              "How many legs does a spider have?", "What time is it?", "Is water wet?",
              "Which planet is largest?", "How should I learn to code?", "What does a reward model do?")
_ANSWERS = ("The capital of France is Paris.", "Plants grow with light, water and soil.",
            "Sunlight scatters in the air, and blue scatters most.", "Gravity pulls masses together.",
            "Most penguins live in the southern hemisphere.", "I am not sure who wrote it.",
            "A spider has eight legs.", "I cannot see a clock, sorry.", "Water makes other things wet.",
            "Jupiter is the largest planet.", "Start small, practise daily, and read good code.",
            "It scores answers so that training can prefer better ones.")
_NOUNS = ("apple", "banana", "cherry", "dolphin", "elephant", "falcon", "guitar", "harbour", "island",
          "jacket", "kettle", "lantern", "meadow", "notebook", "orchestra", "pepper", "quartz", "rabbit",
          "saddle", "tomato", "umbrella", "violin", "window", "yogurt", "zebra", "anchor", "blanket",
          "candle", "desert", "engine", "forest", "glacier", "hammer", "insect", "jungle", "kitchen",
          "ladder", "magnet", "needle", "ocean", "pillow", "puzzle", "rocket", "salmon", "tunnel",
          "valley", "wizard", "oxygen", "computer", "language", "science", "medicine", "economy",
          "festival", "holiday", "journey", "triangle", "circle", "square", "thunder", "volcano")
_ADJECTIVES = ("bright", "heavy", "gentle", "strange", "ancient", "modern", "fragile", "golden", "hollow",
               "narrow", "polite", "rapid", "silent", "tiny", "enormous", "careful", "honest", "clever")
_EXTRA = ("Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2024 3.14 -7 50%.",
          "Punctuation (brackets), [lists], {sets}; quotes \"like this\" and 'that' - dashes: yes!",
          "Code: def add(a, b): return a + b  # comment\nprint(add(2, 3))",
          "Unicode: café, naïve, über, señor, 東京, Привет, emoji 🙂.",
          "Thank you! You're welcome. Please, could you help me? Sure, happy to help.")


def default_corpus() -> list[str]:
    """A deterministic corpus of ~400 varied English lines (statements, Q&A, ChatML turns)."""
    lines = list(_EXTRA)
    for i, (subj, verb) in enumerate(itertools.product(_SUBJECTS, _VERBS)):
        obj, place = _OBJECTS[(i * 5) % len(_OBJECTS)], _PLACES[(i * 7) % len(_PLACES)]
        lines.append(f"{subj.capitalize()} {verb} {obj} {place}.")
        if i % 3 == 0:
            lines.append(f"Yesterday {subj} {verb.rstrip('s')}ed {obj}, and then {place} it was quiet.")
    for i, noun in enumerate(_NOUNS):
        adj, other = _ADJECTIVES[i % len(_ADJECTIVES)], _NOUNS[(i * 11 + 3) % len(_NOUNS)]
        lines.append(f"The {adj} {noun} is next to the {other}; many {noun}s were {adj}er before.")
        lines.append(f"Question: where is the {noun}? Answer: behind the {other}, quite {adj}ly.")
    for q, a in zip(_QUESTIONS, _ANSWERS, strict=True):
        lines += [q, a, f"{BOS}user\n{q}{EOS}\n{BOS}assistant\n{a}{EOS}\n"]
    return lines


def _train_tokenizer(corpus: list[str], vocab_size: int):
    """Byte-level BPE (round-trips any text) wrapped as a fast HF tokenizer with the ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, BOS, EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(corpus, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                  unk_token=PAD)
    tok.chat_template = templates.chatml()
    return tok


def _llama_config(tok, hidden_size: int, layers: int, heads: int, kv_heads: int, num_labels: int | None):
    from transformers import LlamaConfig

    extra = {"num_labels": num_labels} if num_labels is not None else {}
    return LlamaConfig(vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                       max_position_embeddings=2048, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                       tie_word_embeddings=True, **extra)


def _build(out_dir: str | Path, *, seed: int, vocab_size: int, hidden_size: int, layers: int, heads: int,
           kv_heads: int, corpus: list[str] | None, reward: bool) -> Path:
    from transformers import LlamaForCausalLM, LlamaForSequenceClassification

    out = Path(out_dir)
    tok = _train_tokenizer(default_corpus() + list(corpus or []), vocab_size)
    cfg = _llama_config(tok, hidden_size, layers, heads, kv_heads, num_labels=1 if reward else None)
    # fork_rng: the caller's global RNG state is left as it was; only this init is seeded.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = (LlamaForSequenceClassification if reward else LlamaForCausalLM)(cfg)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def build_tiny(out_dir: str | Path, *, seed: int = 0, vocab_size: int = 1000, hidden_size: int = 64,
               layers: int = 2, heads: int = 4, kv_heads: int = 2, corpus: list[str] | None = None) -> Path:
    """Write a random tiny LlamaForCausalLM + BPE tokenizer to `out_dir`; same seed -> identical weights.

    `corpus` lines are added to the built-in corpus for tokenizer training. The model's vocab equals the
    tokenizer's length (the built-in corpus reaches 1000). Returns `out_dir` as a Path.
    """
    return _build(out_dir, seed=seed, vocab_size=vocab_size, hidden_size=hidden_size, layers=layers,
                  heads=heads, kv_heads=kv_heads, corpus=corpus, reward=False)


def build_tiny_reward(out_dir: str | Path, *, seed: int = 0, vocab_size: int = 1000, hidden_size: int = 64,
                      layers: int = 2, heads: int = 4, kv_heads: int = 2,
                      corpus: list[str] | None = None) -> Path:
    """Like `build_tiny`, but a LlamaForSequenceClassification with num_labels=1 and a random `score` head.

    The tokenizer is identical to `build_tiny`'s for the same corpus, so policy and reward share ids.
    """
    return _build(out_dir, seed=seed, vocab_size=vocab_size, hidden_size=hidden_size, layers=layers,
                  heads=heads, kv_heads=kv_heads, corpus=corpus, reward=True)
