"""``first-run``: generate with a bundle through ExecuTorch (pybindings) or onnxruntime."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from .bundle import BACKENDS, BundleError


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--prompt", required=True, help="Prompt text (sent as a user turn when there is a chat template).")
@click.option("--max-new-tokens", type=click.IntRange(0, 1 << 20), default=32, show_default=True)
@click.option("--backend", default="executorch", show_default=True, help=f"One of {', '.join(BACKENDS)}.")
@click.option("--mask", default="auto", show_default=True,
              help="auto (routers decide at prefill), all, or BITS: one 0/1 per layer, 1 = the layer runs.")
@click.option("--threads", type=click.IntRange(1, 256), default=None, help="Runtime CPU threads.")
@click.option("--raw", is_flag=True, help="Do not apply the chat template.")
@click.option("--json", "as_json", is_flag=True, help="Print the run result as one JSON object.")
def main(bundle: Path, prompt: str, max_new_tokens: int, backend: str, mask: str, threads: int | None, raw: bool,
         as_json: bool) -> None:
    """Run BUNDLE on PROMPT: prefill decides the layer mask, decode calls only the layers that run."""
    from .runner import BundleRunner, check_text

    if backend not in BACKENDS:
        raise click.ClickException(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    try:
        check_text(prompt, "--prompt")  # undecodable bytes in argv arrive as lone surrogates
        runner = BundleRunner(bundle, backend=backend, threads=threads)

        def stream(piece: str) -> None:
            sys.stdout.write(piece)
            sys.stdout.flush()

        result = runner.generate(prompt, max_new_tokens=max_new_tokens, mask=mask,
                                 stream=None if as_json else stream, chat=not raw)
    except (BundleError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    except OSError as e:  # a bundle file that cannot be read (permissions, I/O error)
        raise click.ClickException(f"{bundle}: {e.strerror or e}") from None
    result["threads"] = threads
    if as_json:
        click.echo(json.dumps(result))
        return
    click.echo("")
    click.echo(f"[mask {result['mask']} skip {result['skip_ratio']:.0%} | prefill {result['prefill_ms']:.1f} ms | "
               f"decode {result['decode_ms_per_token']:.2f} ms/token ({result['tokens_per_s']:.1f} tok/s) | "
               f"peak RSS {result['peak_rss_mb']:.0f} MB]", err=True)


if __name__ == "__main__":
    main()
