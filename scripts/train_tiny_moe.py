#!/usr/bin/env python3
"""Seeded training of the bundled MoE testbeds on the public-domain corpus.

``--arch`` picks the model (`ARCHS`): ``tiny-moe`` (Mixtral, 4 layers, 16 experts top-4) or
``deep-moe`` (OLMoE: 8 layers, 32 experts top-8, routing weights not renormalised);
``--set key=value`` overrides single config fields (JSON values).

Stages (each skipped when its output exists):
  1. Tokenizer trained on the corpus train splits: tiny-moe a SentencePiece BPE (8k vocab,
     byte fallback, Llama conventions, ``tokenizer.model`` too), deep-moe a byte-level BPE
     (4k vocab, GPT-2 pre-tokenizer).
  2. Token cache: every source's train split and held-out split as uint16 arrays.
  3. Training with the router load-balancing loss, random windows of the concatenated
     train tokens, AdamW + warmup + cosine decay.
     Checkpoints (model, optimizer, step) go to ``<work>/ckpt`` every ``--ckpt-every``
     steps; ``--resume`` continues from there. The loss curve goes to ``<work>/log.json``.
  4. Export: the model in bf16 safetensors plus tokenizer files into ``--out``.

``--steps 0`` exports the untrained model (to check conversion before training);
``--export-only`` exports the last checkpoint of an interrupted run.
Run corpus building first: ``scripts/build_corpus.py``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

CORPUS = Path.home() / ".cache" / "allocmoe-edge" / "corpus"
SOURCES = ["austen", "web_bible", "tdavid", "mhcc", "shakespeare", "milton"]
REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "allocmoe_edge" / "assets"
EOT = "<|endoftext|>"


@dataclass(frozen=True)
class Testbed:
    """A bundled model: its transformers config fields and its tokenizer."""

    config: dict[str, Any]  # model_type and config fields; the tokenizer fixes vocab_size
    tokenizer: str  # "spm": SentencePiece BPE, Llama conventions; "bpe": byte-level BPE, GPT-2 pre-tokenizer
    vocab: int  # entries of a newly trained tokenizer


_COMMON = dict(max_position_embeddings=512, rms_norm_eps=1e-5, output_router_logits=True, pad_token_id=None)
ARCHS: dict[str, Testbed] = {
    # Mixtral: softmax over the top-k router logits; 17.5M parameters, about 6M active
    "tiny-moe": Testbed(dict(_COMMON, model_type="mixtral", hidden_size=256, intermediate_size=256,
                             num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                             num_local_experts=16, num_experts_per_tok=4, rope_theta=10000.0,
                             tie_word_embeddings=False, router_aux_loss_coef=0.02, router_jitter_noise=0.0,
                             bos_token_id=1, eos_token_id=2), "spm", 8000),
    # OLMoE: softmax over all 32 experts, top-8, weights not renormalised; q/k RMS norms; llama.cpp's
    # olmoe graph needs its own output matrix (no tying) and one KV head per head. A 4,096-entry
    # byte-level BPE keeps the bf16 file under 16 MB (llama.cpp's converter reads OLMoE's vocabulary
    # as BPE only, so the SentencePiece tokenizer of tiny-moe cannot be reused).
    "deep-moe": Testbed(dict(_COMMON, model_type="olmoe", hidden_size=128, intermediate_size=64,
                             num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=4, num_experts=32,
                             num_experts_per_tok=8, norm_topk_prob=False, rope_theta=10000.0,
                             tie_word_embeddings=False, router_aux_loss_coef=0.01, bos_token_id=0,
                             eos_token_id=0), "bpe", 4096),
}


def model_config(arch: str, vocab_size: int, overrides: dict[str, Any] | None = None):
    """The transformers config of testbed ``arch`` (`ARCHS`) with ``overrides`` applied."""
    from transformers import AutoConfig

    fields = {**ARCHS[arch].config, "vocab_size": vocab_size, **(overrides or {})}
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` with a JSON value (a bare word stays a string)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--set {text!r}: expected key=value")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


# ---------------------------------------------------------------- tokenizer

def train_spm_tokenizer(corpus: Path, tok_dir: Path, vocab_size: int, seed: int) -> None:
    """Train a SentencePiece BPE model and write Llama-compatible tokenizer files."""
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    tok_dir.mkdir(parents=True, exist_ok=True)
    spm.set_random_generator_seed(seed)
    spm.SentencePieceTrainer.train(
        input=[str(corpus / f"{s}.train.txt") for s in SOURCES], model_prefix=str(tok_dir / "tokenizer"),
        vocab_size=vocab_size, model_type="bpe", byte_fallback=True, split_digits=True,
        character_coverage=0.9995, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, input_sentence_size=1_000_000,
        shuffle_input_sentence=True, max_sentence_length=16384, num_threads=2, minloglevel=1,
    )
    (tok_dir / "tokenizer.vocab").unlink()
    tok = LlamaTokenizer.from_pretrained(str(tok_dir), legacy=True, add_bos_token=True, add_eos_token=False)
    tok.save_pretrained(str(tok_dir))


def train_bpe_tokenizer(corpus: Path, tok_dir: Path, vocab_size: int) -> None:
    """Train a byte-level BPE (GPT-2's pre-tokenizer regex, ``<|endoftext|>`` as BOS and EOS, id 0).

    Deterministic for a given corpus. ``add_bos_token`` is written to tokenizer_config.json so
    that llama.cpp (which reads it from there) starts sequences with BOS as transformers users do,
    and the generic tokenizer class so that transformers 4.x loads it too."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([str(corpus / f"{s}.train.txt") for s in SOURCES], trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOT, eos_token=EOT).save_pretrained(str(tok_dir))
    config = tok_dir / "tokenizer_config.json"
    fields = {**json.loads(config.read_text()), "add_bos_token": True, "tokenizer_class": "PreTrainedTokenizerFast"}
    config.write_text(json.dumps(fields, indent=2) + "\n")


def vocab_size(tok_dir: Path) -> int:
    """Entries of the tokenizer in ``tok_dir``."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tok_dir / "tokenizer.json")).get_vocab_size()


def batch_encoder(tok_dir: Path) -> tuple[Callable[[list[str]], list[list[int]]], int]:
    """A function that encodes a list of texts, and the EOS id: SentencePiece's own encoder when
    ``tokenizer.model`` exists (how tiny-moe's token cache was made), else the fast tokenizer."""
    if (tok_dir / "tokenizer.model").exists():
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(tok_dir / "tokenizer.model"))
        return (lambda texts: sp.encode(texts, num_threads=2)), sp.eos_id()
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    return (lambda texts: [e.ids for e in tok.encode_batch(texts)]), tok.token_to_id(EOT)


def encode_file(encode: Callable[[list[str]], list[list[int]]], path: Path, chunk_chars: int = 1 << 16) -> np.ndarray:
    """Token ids of a text file, encoded in line-aligned chunks."""
    text = path.read_text(encoding="utf-8")
    chunks, i = [], 0
    while i < len(text):
        j = text.find("\n", i + chunk_chars)
        j = len(text) if j < 0 else j + 1
        chunks.append(text[i:j])
        i = j
    return np.fromiter((t for c in encode(chunks) for t in c), dtype=np.uint16)


def token_cache(corpus: Path, tok_dir: Path, cache: Path) -> dict[str, np.ndarray]:
    """Train and held-out token arrays (``<split>.npy``), EOS between sources."""
    cache.mkdir(parents=True, exist_ok=True)
    out = {}
    for split in ("train", "heldout"):
        f = cache / f"{split}.npy"
        if not f.exists():
            encode, eos = batch_encoder(tok_dir)
            parts = []
            for s in SOURCES:
                parts += [encode_file(encode, corpus / f"{s}.{split}.txt"), np.array([eos], np.uint16)]
            np.save(f, np.concatenate(parts))
        out[split] = np.load(f)
    return out


# ---------------------------------------------------------------- training

def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warmup, then cosine decay to 10% of ``lr``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    p = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))


@torch.no_grad()
def eval_loss(model, windows: torch.Tensor) -> float:
    """Mean next-token cross-entropy (no router loss) over fixed windows."""
    model.eval()
    losses = [model(input_ids=w[None], labels=w[None], output_router_logits=False).loss.item() for w in windows]
    model.train()
    return float(np.mean(losses))


def save_ckpt(model, opt, step: int, log: list, work: Path) -> None:
    """Write a resumable checkpoint atomically (model in fp32, optimizer, step, log)."""
    tmp, final = work / "ckpt.tmp", work / "ckpt"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    torch.save({"opt": opt.state_dict(), "step": step}, tmp / "train_state.pt")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    (work / "log.json").write_text(json.dumps(log, indent=1))


def new_model(args: argparse.Namespace):
    """A freshly initialised model of ``args.arch`` (seeded)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(args.seed)
    return AutoModelForCausalLM.from_config(model_config(args.arch, args.vocab, dict(args.set)), dtype=torch.float32)


def load_checkpoint(path: Path):
    """The fp32 model of a checkpoint written by `save_ckpt`."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)


def train(args: argparse.Namespace, data: dict[str, np.ndarray]):
    """Train (or resume) and return the model."""
    gen = np.random.default_rng(args.seed)
    ckpt = args.work / "ckpt"
    log: list[dict] = []
    start = 0
    if args.resume and ckpt.exists():
        model = load_checkpoint(ckpt)
        state = torch.load(ckpt / "train_state.pt", weights_only=False)
        start = state["step"]
        log = json.loads((args.work / "log.json").read_text())
    else:
        model = new_model(args)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    if start:
        opt.load_state_dict(state["opt"])
    train_ids = torch.from_numpy(data["train"].astype(np.int64))
    held = torch.from_numpy(data["heldout"].astype(np.int64))
    ev_starts = np.linspace(0, len(held) - args.seq - 1, args.eval_windows).astype(int)
    ev_windows = torch.stack([held[s:s + args.seq] for s in ev_starts])
    # one batch of offsets per step, drawn up front so resuming gives the same stream
    offsets = gen.integers(0, len(train_ids) - args.seq - 1, size=(args.steps, args.batch))
    t0, tokens_per_step = time.time(), args.batch * args.seq
    for step in range(start, args.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        batch = torch.stack([train_ids[o:o + args.seq] for o in offsets[step]])
        out = model(input_ids=batch, labels=batch)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        done = step + 1
        if done % args.log_every == 0 or done == args.steps:
            el = time.time() - t0
            rec = {"step": done, "tokens": done * tokens_per_step, "loss": round(out.loss.item(), 4),
                   "aux_loss": round(out.aux_loss.item(), 4), "lr": opt.param_groups[0]["lr"],
                   "elapsed_s": round(el, 1), "tok_per_s": round((done - start) * tokens_per_step / el, 1)}
            if done % args.eval_every == 0 or done == args.steps:
                rec["heldout_loss"] = round(eval_loss(model, ev_windows), 4)
            log.append(rec)
            print(json.dumps(rec), flush=True)
        if done % args.ckpt_every == 0 or done == args.steps:
            save_ckpt(model, opt, done, log, args.work)
        if args.max_minutes and time.time() - t0 > 60 * args.max_minutes:
            print(f"time limit reached at step {done}; stopping", flush=True)
            save_ckpt(model, opt, done, log, args.work)
            break
    return model


def export(model, tok_dir: Path, out: Path) -> None:
    """Write the model (bf16 safetensors) and tokenizer files to ``out``.

    The shipped config has ``output_router_logits`` off so that ``loss`` is plain
    cross-entropy for users of the checkpoint (the router loss is a training device).
    """
    out.mkdir(parents=True, exist_ok=True)
    model.config.output_router_logits = False
    model.to(torch.bfloat16).save_pretrained(str(out))
    for f in tok_dir.iterdir():
        shutil.copy2(f, out / f.name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", choices=sorted(ARCHS), default="tiny-moe", help="which testbed to train")
    ap.add_argument("--set", type=parse_override, action="append", default=[], metavar="KEY=VALUE",
                    help="override one config field (JSON value), for example --set num_hidden_layers=2")
    ap.add_argument("--corpus", type=Path, default=CORPUS)
    ap.add_argument("--work", type=Path, help="checkpoints, log and token cache (default runs/<arch>)")
    ap.add_argument("--out", type=Path, help="exported model (default allocmoe_edge/assets/<arch>)")
    ap.add_argument("--vocab", type=int, default=0, help="entries of a newly trained tokenizer (0: the testbed's)")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--eval-windows", type=int, default=32)
    ap.add_argument("--ckpt-every", type=int, default=200)
    ap.add_argument("--max-minutes", type=float, default=0.0, help="stop (and checkpoint) after this long")
    ap.add_argument("--threads", type=int, default=1, help="1 avoids thread oversubscription on shared cores")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--export-only", action="store_true", help="export <work>/ckpt and exit")
    args = ap.parse_args()
    args.work = args.work or REPO / "runs" / args.arch
    args.out = args.out or ASSETS / args.arch

    torch.set_num_threads(args.threads)
    tok_dir = args.work / "tokenizer"
    if not (tok_dir / "tokenizer.json").exists():
        testbed = ARCHS[args.arch]
        if testbed.tokenizer == "spm":
            train_spm_tokenizer(args.corpus, tok_dir, args.vocab or testbed.vocab, args.seed)
        else:
            train_bpe_tokenizer(args.corpus, tok_dir, args.vocab or testbed.vocab)
    args.vocab = vocab_size(tok_dir)
    if args.export_only:
        model = load_checkpoint(args.work / "ckpt")
    else:
        data = token_cache(args.corpus, tok_dir, args.work / "tokens")
        print(f"train tokens {len(data['train']):,}, held-out tokens {len(data['heldout']):,}", flush=True)
        args.work.mkdir(parents=True, exist_ok=True)
        model = new_model(args) if args.steps == 0 else train(args, data)
    export(model, tok_dir, args.out)


if __name__ == "__main__":
    main()
