#!/usr/bin/env python3
"""Seeded training of the bundled tiny Mixtral-style MoE on the public-domain corpus.

Stages (each skipped when its output exists):
  1. SentencePiece BPE tokenizer (8k vocab, byte fallback, Llama conventions) trained on
     the corpus train splits, saved with Llama tokenizer files (``tokenizer.model`` too).
  2. Token cache: every source's train split and held-out split as uint16 arrays.
  3. Training of ``MixtralForCausalLM`` with the router load-balancing loss, random
     windows of the concatenated train tokens, AdamW + warmup + cosine decay.
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
from pathlib import Path

import numpy as np
import torch

CORPUS = Path.home() / ".cache" / "allocmoe-edge" / "corpus"
SOURCES = ["austen", "web_bible", "tdavid", "mhcc", "shakespeare", "milton"]
REPO = Path(__file__).resolve().parents[1]


def model_config(vocab_size: int, seq: int):
    """The tiny Mixtral configuration (about 17.7M parameters, about 6M active)."""
    from transformers import MixtralConfig

    return MixtralConfig(
        vocab_size=vocab_size, hidden_size=256, intermediate_size=256, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=16, num_experts_per_tok=4,
        max_position_embeddings=max(512, seq), rope_theta=10000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=False, output_router_logits=True, router_aux_loss_coef=0.02,
        router_jitter_noise=0.0, bos_token_id=1, eos_token_id=2, pad_token_id=None,
    )


# ---------------------------------------------------------------- tokenizer

def train_tokenizer(corpus: Path, tok_dir: Path, vocab_size: int, seed: int) -> None:
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


def encode_file(sp, path: Path, chunk_chars: int = 1 << 16) -> np.ndarray:
    """Token ids of a text file, encoded in line-aligned chunks."""
    text = path.read_text(encoding="utf-8")
    chunks, i = [], 0
    while i < len(text):
        j = text.find("\n", i + chunk_chars)
        j = len(text) if j < 0 else j + 1
        chunks.append(text[i:j])
        i = j
    ids = sp.encode(chunks, num_threads=2)
    return np.fromiter((t for c in ids for t in c), dtype=np.uint16)


def token_cache(corpus: Path, tok_dir: Path, cache: Path) -> dict[str, np.ndarray]:
    """Train and held-out token arrays (``<split>.npy``), EOS between sources."""
    import sentencepiece as spm

    cache.mkdir(parents=True, exist_ok=True)
    out = {}
    for split in ("train", "heldout"):
        f = cache / f"{split}.npy"
        if not f.exists():
            sp = spm.SentencePieceProcessor(model_file=str(tok_dir / "tokenizer.model"))
            parts = []
            for s in SOURCES:
                parts += [encode_file(sp, corpus / f"{s}.{split}.txt"), np.array([sp.eos_id()], np.uint16)]
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


def train(args: argparse.Namespace, data: dict[str, np.ndarray], tok_dir: Path):
    """Train (or resume) and return the model."""
    from transformers import MixtralForCausalLM

    torch.manual_seed(args.seed)
    gen = np.random.default_rng(args.seed)
    cfg = model_config(args.vocab, args.seq)
    ckpt = args.work / "ckpt"
    log: list[dict] = []
    start = 0
    if args.resume and ckpt.exists():
        model = MixtralForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32)
        state = torch.load(ckpt / "train_state.pt", weights_only=False)
        start = state["step"]
        log = json.loads((args.work / "log.json").read_text())
    else:
        model = MixtralForCausalLM(cfg)
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
    ap.add_argument("--corpus", type=Path, default=CORPUS)
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "tiny-moe")
    ap.add_argument("--out", type=Path, default=REPO / "allocmoe_edge" / "assets" / "tiny-moe")
    ap.add_argument("--vocab", type=int, default=8000)
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

    torch.set_num_threads(args.threads)
    tok_dir = args.work / "tokenizer"
    if not (tok_dir / "tokenizer.model").exists():
        train_tokenizer(args.corpus, tok_dir, args.vocab, args.seed)
    if args.export_only:
        from transformers import MixtralForCausalLM

        model = MixtralForCausalLM.from_pretrained(str(args.work / "ckpt"), dtype=torch.float32)
    else:
        data = token_cache(args.corpus, tok_dir, args.work / "tokens")
        print(f"train tokens {len(data['train']):,}, held-out tokens {len(data['heldout']):,}", flush=True)
        args.work.mkdir(parents=True, exist_ok=True)
        if args.steps == 0:
            from transformers import MixtralForCausalLM

            torch.manual_seed(args.seed)
            model = MixtralForCausalLM(model_config(args.vocab, args.seq))
        else:
            model = train(args, data, tok_dir)
    export(model, tok_dir, args.out)


if __name__ == "__main__":
    main()
