"""A randomly initialised decoder of Qwen2-0.5B's shape, written as a model folder the learner reads.

    python benchmarks/gpu_models.py FOLDER [--tiny] [--device cuda] --out decoder.json

For speed figures only: the weights are random (nothing is downloaded). The
tokenizer is a byte-level BPE like Qwen2's (digits one by one), trained here
in seconds on the words of all-MiniLM-L6-v2's vocabulary (shipped with the
default model) and the bench's item texts, so an item text cuts into about
as many tokens as Qwen2's own tokenizer makes of it (transformers reads a
qwen2 folder's tokenizer as Qwen2's class, so a WordPiece one cannot be
reused). ``--tiny`` keeps the architecture but shrinks every size, for the
CPU rehearsal.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Qwen2-0.5B's shape (its config.json); tie_word_embeddings as shipped.
QWEN2_05B = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                 intermediate_size=4864, vocab_size=151936, max_position_embeddings=32768,
                 rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)
TINY = dict(QWEN2_05B, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, vocab_size=32_000, max_position_embeddings=512)
TOKENIZER_VOCAB = 32_000


def build_tokenizer():
    """A byte-level BPE tokenizer with Qwen2's special tokens, trained offline in a few seconds."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from stream.bench.common import BenchWorld
    from stream.config import default_model_path

    vocab = (Path(default_model_path()) / "vocab.txt").read_text().split("\n")
    words = [w for w in vocab if w and not w.startswith(("[", "##"))]
    corpus = words + [" " + w for w in words] + [" " + w.title() for w in words]
    corpus += [item.text for item in BenchWorld(1, 2_000, 2_000).items()]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TOKENIZER_VOCAB, special_tokens=["<|endoftext|>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<|endoftext|>")


def build_decoder(folder: Path, *, tiny: bool, device: str) -> dict:
    import torch
    from transformers import Qwen2Config, Qwen2Model

    started = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(folder)
    shape = TINY if tiny else QWEN2_05B
    config = Qwen2Config(**shape, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.eos_token_id, architectures=["Qwen2ForCausalLM"])
    torch.manual_seed(0)
    # Initialising 0.5B parameters is several times faster on the accelerator than on its host's CPU.
    with torch.device(device):
        model = Qwen2Model(config)
    params = sum(p.numel() for p in model.parameters())
    # bf16 on disk halves the write; the learner loads it as fp32 like every model.
    model.to(torch.bfloat16).cpu().save_pretrained(folder)
    return {"path": str(folder), "params": params, "shape": shape,
            "tokenizer": f"byte-level BPE, {len(tokenizer)} tokens, trained on MiniLM's vocabulary words",
            "weights": "random (seed 0), saved as bfloat16", "seconds": round(time.perf_counter() - started, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--tiny", action="store_true", help="small sizes, same architecture (CPU rehearsal)")
    parser.add_argument("--device", default="cpu", help="where the weights are initialised")
    parser.add_argument("--out", required=True, help="JSON describing the folder")
    args = parser.parse_args()
    info = build_decoder(args.folder, tiny=args.tiny, device=args.device)
    Path(args.out).write_text(json.dumps(info, indent=1))
    print(f"decoder: {info['params'] / 1e6:.1f} M parameters in {args.folder} ({info['seconds']} s)")


if __name__ == "__main__":
    main()
