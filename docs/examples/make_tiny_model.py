"""Write a tiny random Llama model (Hugging Face folder + byte-level tokenizer) and random FiRST routers.

Every firstkit command accepts it in place of the default model, so the whole pipeline can be tried (and the
docs examples tested) in seconds, offline:

    python docs/examples/make_tiny_model.py tiny
    first-run ... / first-export --model tiny/model --routers tiny/routers ...

The outputs are random: they show the tools working, not a useful model.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import click


def byte_tokenizer():
    """A real byte-level BPE tokenizer (256 byte tokens + <pad>, <s>, </s>), built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--layers", default=4, show_default=True, type=click.IntRange(2, 64), help="Decoder layers.")
@click.option("--seed", default=0, show_default=True, type=int)
def main(out: Path, layers: int, seed: int) -> None:
    """Write OUT/model (HF folder with tokenizer) and OUT/routers (router checkpoint)."""
    from firstkit.testing import tiny_model

    fm = tiny_model("llama", num_layers=layers, seed=seed, vocab_size=260)
    if out.exists() and any(out.iterdir()):
        raise click.ClickException(f"{out} exists and is not empty")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-tiny-", dir=out.parent))
    try:
        fm.unwrap_layers().save_pretrained(tmp / "model")
        byte_tokenizer().save_pretrained(tmp / "model")
        fm.routers.save_pretrained(tmp / "routers")
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    click.echo(f"wrote {out}/model and {out}/routers ({layers} layers, random weights)")


if __name__ == "__main__":
    main()
