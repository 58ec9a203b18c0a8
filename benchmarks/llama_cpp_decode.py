"""llama.cpp peer: greedy decode tok/s of a GGUF with llama-cpp-python, in its own process.

    pip install llama-cpp-python   # on some VMs build with CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON ..."
    python benchmarks/llama_cpp_decode.py SmolLM2-135M-Instruct.Q4_1.gguf --threads 1 --tokens 64 --reps 3

Runs without PyTorch in the process (llama.cpp and torch in one process crashed here). Prints one JSON
line per repetition: threads, generated tokens, prefill ms (time to the first token), decode tok/s.
"""

from __future__ import annotations

import json
import time

import click

PROMPT = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
          "<|im_start|>user\nExplain in two sentences why the sky is blue.<|im_end|>\n<|im_start|>assistant\n")


@click.command()
@click.argument("gguf", type=click.Path(exists=True, dir_okay=False))
@click.option("--threads", default="1", show_default=True, help="comma-separated thread counts")
@click.option("--tokens", default=64, show_default=True)
@click.option("--reps", default=3, show_default=True)
@click.option("--prompt", default=PROMPT, help="raw prompt text (chat template already applied)")
def main(gguf: str, threads: str, tokens: int, reps: int, prompt: str) -> None:
    from llama_cpp import Llama

    for t in (int(x) for x in threads.split(",")):
        llm = Llama(model_path=gguf, n_ctx=512, n_threads=t, n_threads_batch=t, verbose=False)
        for rep in range(reps):
            llm.reset()
            start, first, n = time.perf_counter(), None, 0
            for _ in llm.create_completion(prompt, max_tokens=tokens, temperature=0.0, stream=True):
                n += 1
                first = first or time.perf_counter()
            end = time.perf_counter()
            click.echo(json.dumps({"threads": t, "rep": rep, "tokens": n, "prefill_ms": round((first - start) * 1e3, 1),
                                   "decode_tok_s": round((n - 1) / (end - first), 2)}))


if __name__ == "__main__":
    main()
