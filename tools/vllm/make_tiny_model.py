#!/usr/bin/env python3
"""Generate a tiny random-weight Llama model plus a sentencepiece tokenizer, offline.

Usage: make_tiny_model.py OUT_DIR [--force]

The model is only meant to exercise the real vLLM engine end to end (load,
schedule, sample, stream); its output is gibberish.  Everything is generated
locally: the tokenizer is trained on text this script writes itself, the
weights are random with a fixed seed.  No network, no model hub.

Idempotent: when OUT_DIR already holds a complete model produced by this very
script version (stamp file + checksums of every file), it exits at once without
importing torch.  Otherwise the model is built in a temporary sibling directory
and renamed into place atomically.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path

# Shape of the model.  hidden 128 / 4 heads (head_dim 32) is known to serve;
# hidden 64 / 4 heads (head_dim 16) passes /health and then crashes vLLM's CPU
# attention on the first request.
HIDDEN = 128
HEADS = 4
KV_HEADS = 4
LAYERS = 2
INTERMEDIATE = 256
VOCAB = 1000
MAX_POS = 2048
SEED = 1234

STAMP = ".citadel-tiny-model.json"
REQUIRED = [
    "config.json",
    "model.safetensors",
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
]

# Minimal chat template: role-tagged turns, bos first, eos after each turn.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

WORDS = (
    "the a an one two three red green blue small large quick slow bright dark "
    "cat dog bird fish tree river mountain city road house door window table "
    "runs walks jumps sees finds makes takes gives keeps holds moves turns "
    "over under near far into from with without about before after between "
    "model server engine token request stream answer question system user "
    "assistant hello world citadel gateway service memory process thread "
    "quietly loudly slowly quickly carefully happily again always never often "
    "zero four five six seven eight nine ten hundred thousand data signal"
).split()


def script_digest() -> str:
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def is_complete(out: Path) -> bool:
    stamp = out / STAMP
    try:
        meta = json.loads(stamp.read_text())
    except (OSError, ValueError):
        return False
    if meta.get("script_sha256") != script_digest():
        return False
    files = meta.get("files", {})
    if any(name not in files for name in REQUIRED):
        return False
    for name, digest in files.items():
        p = out / name
        if not p.is_file() or file_digest(p) != digest:
            return False
    return True


def corpus_lines(n: int = 20000) -> list[str]:
    rng = random.Random(SEED)
    lines = []
    for i in range(n):
        k = rng.randint(4, 14)
        words = [rng.choice(WORDS) for _ in range(k)]
        if i % 7 == 0:
            words.append(str(rng.randint(0, 99999)))
        s = " ".join(words)
        lines.append(s[0].upper() + s[1:] + rng.choice([".", "?", "!", ","]))
    return lines


def train_tokenizer(work: Path) -> Path:
    import sentencepiece as spm

    # Train from an in-memory iterator into an in-memory writer: the trainer
    # spec serialized into tokenizer.model then holds no (temporary) paths, so
    # the file is byte-for-byte reproducible.
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus_lines()),
        model_writer=model,
        model_type="bpe",
        vocab_size=VOCAB,
        character_coverage=1.0,
        byte_fallback=True,
        split_digits=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        user_defined_symbols=["<|system|>", "<|user|>", "<|assistant|>"],
        num_threads=1,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    path = work / "tokenizer.model"
    path.write_bytes(model.getvalue())
    return path


def build(out_tmp: Path, work: Path) -> None:
    import torch
    import transformers
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    sp_model = train_tokenizer(work)
    shutil.copyfile(sp_model, out_tmp / "tokenizer.model")

    # Hand-written config next to tokenizer.model; transformers converts the
    # sentencepiece model (tokenizer.json) on load, and save_pretrained writes
    # the converted fast tokenizer next to it.
    base_cfg = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": MAX_POS,
    }
    cfg_path = out_tmp / "tokenizer_config.json"
    cfg_path.write_text(json.dumps(base_cfg, indent=2, sort_keys=True) + "\n")
    tok = AutoTokenizer.from_pretrained(str(out_tmp))
    tok.save_pretrained(str(out_tmp))
    # Keep the chat template inside tokenizer_config.json (single source) and
    # drop load-time artifacts.
    tcfg = json.loads(cfg_path.read_text())
    for k in ("is_local", "local_files_only", "name_or_path"):
        tcfg.pop(k, None)
    tcfg["chat_template"] = CHAT_TEMPLATE
    tcfg["model_max_length"] = MAX_POS
    tcfg["add_bos_token"] = True
    tcfg["add_eos_token"] = False
    cfg_path.write_text(json.dumps(tcfg, indent=2, sort_keys=True) + "\n")
    jinja = out_tmp / "chat_template.jinja"
    if jinja.exists():
        jinja.unlink()
    smap = out_tmp / "special_tokens_map.json"
    if not smap.exists():
        smap.write_text(
            json.dumps(
                {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
                indent=2,
                sort_keys=True,
            )
            + "\n"
        )

    vocab = len(tok)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=MAX_POS,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=None,
    )
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    model.save_pretrained(str(out_tmp), safe_serialization=True)

    # Sanity: reload tokenizer, render the chat template, run one forward pass.
    t2 = AutoTokenizer.from_pretrained(str(out_tmp))
    rendered = t2.apply_chat_template(
        [{"role": "user", "content": "hello world"}], tokenize=False, add_generation_prompt=True
    )
    assert "<|assistant|>" in rendered, rendered
    ids = t2("the quick cat runs over the river", return_tensors="pt").input_ids
    assert ids.shape[1] > 2 and int(ids.max()) < vocab
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape[-1] == vocab

    files = {
        p.name: file_digest(p)
        for p in sorted(out_tmp.iterdir())
        if p.is_file() and p.name != STAMP
    }
    meta = {
        "script_sha256": script_digest(),
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "shape": {
            "hidden": HIDDEN,
            "heads": HEADS,
            "layers": LAYERS,
            "intermediate": INTERMEDIATE,
            "vocab": vocab,
            "max_position_embeddings": MAX_POS,
            "seed": SEED,
        },
        "tokenizer_class": type(t2).__name__,
        "files": files,
    }
    (out_tmp / STAMP).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def make_world_readable(root: Path) -> None:
    os.chmod(root, 0o755)
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            os.chmod(os.path.join(dirpath, d), 0o755)
        for f in filenames:
            os.chmod(os.path.join(dirpath, f), 0o644)


def main(argv: list[str]) -> int:
    args = [a for a in argv[1:] if not a.startswith("--")]
    force = "--force" in argv[1:]
    if len(args) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    out = Path(args[0]).resolve()
    if not force and is_complete(out):
        print(f"tiny model already complete: {out}")
        return 0

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.work-", dir=out.parent))
    try:
        build(tmp, work)
        make_world_readable(tmp)
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.rename(out, old)
        os.rename(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    if not is_complete(out):
        print(f"generated model failed validation: {out}", file=sys.stderr)
        return 1
    print(f"tiny model written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
