"""The `firstkit` lm-eval model on tiny random models: same scores as lm-eval's `hf` model and as FirstModel,
routers that see the context only, local task configs that run offline, metrics equal to the reference
libraries'."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import byte_tokenizer

from firstkit.evaluation import lm_eval_tasks as lt
from firstkit.evaluation import stats
from firstkit.evaluation.lm_eval_model import FirstLM, load_entry_points
from firstkit.evaluation.tasks import TASKS, task_from_file
from firstkit.testing import tiny_base_model, tiny_model

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tinylm")
    tiny_base_model("llama", num_layers=6, seed=0, vocab_size=260).save_pretrained(d)
    byte_tokenizer().save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lmdata")
    return {n: lt.prepare(TASKS[n], "test", None, folder) for n in ("copa", "wikitext2", "squad", "wmt22_de_en")}


@pytest.fixture(scope="module")
def routed():
    """A tiny FirstModel whose random routers decide differently per prompt, with a byte tokenizer."""
    fm = tiny_model("llama", num_layers=6, seed=3, vocab_size=260)
    fm.tokenizer = byte_tokenizer()
    return fm


def _evaluate(lm, cfg, limit, chat=False):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    out = simple_evaluate(model=lm, tasks=[cfg], limit=limit, bootstrap_iters=0, log_samples=True,
                          task_manager=TaskManager(include_defaults=False), apply_chat_template=chat)
    return out, sorted(out["samples"][cfg["task"]], key=lambda s: s["doc_id"])


def _req(context, continuation, doc_id=0, kind="loglikelihood"):
    from lm_eval.api.instance import Instance

    args = (context, continuation) if kind == "loglikelihood" else (context,)
    return Instance(kind, {}, args, 0, ("unit", doc_id, 1))


def test_routers_none_mask_all_scores_what_hf_scores(tiny_dir, configs):
    """MC (with left truncation), rolling perplexity and greedy generation: identical to lm-eval's HFLM."""
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    ours = FirstLM(model=str(tiny_dir), routers="none", mask="all", max_length=64)
    hf = HFLM(pretrained=AutoModelForCausalLM.from_pretrained(tiny_dir),
              tokenizer=AutoTokenizer.from_pretrained(tiny_dir), max_length=64, batch_size=1)
    for task, limit in (("copa", 4), ("wikitext2", 1), ("squad", 2)):
        a, sa = _evaluate(ours, configs[task], limit)
        b, sb = _evaluate(hf, configs[task], limit)
        assert [s["resps"] for s in sa] == [s["resps"] for s in sb], task
        assert a["results"][configs[task]["task"]] == b["results"][configs[task]["task"]]


@torch.no_grad()
def test_loglikelihood_equals_firstmodel_for_all_and_forced_masks(tiny_dir):
    torch.set_num_threads(1)
    bits = "101101"
    for mask, batch in (("all", 1), (bits, 1), (bits, 3)):
        lm = FirstLM(model=str(tiny_dir), routers="none", mask=mask, batch_size=batch)
        fm = lm.model
        reqs = [_req("The cat sat on the", " mat", 0), _req("Two plus two is", " four", 1),
                _req("Two plus two is", " five or six", 2)]
        got = lm.loglikelihood(reqs, disable_tqdm=True)
        row = [True] * 6 if mask == "all" else [c == "1" for c in bits]
        for req, (ll, _) in zip(reqs, got, strict=True):
            ctx, cont = lm.tok_encode(req.args[0]), lm.tok_encode(req.args[0] + req.args[1])[len(lm.tok_encode(
                req.args[0])):]
            ids = torch.tensor([ctx + cont])
            logp = torch.log_softmax(fm.forward(ids, mask=row).logits[0].float(), -1)
            ref = sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont))
            assert ll == pytest.approx(ref, abs=1e-4)
            assert lm.mask_log[("unit", req.doc_id)] == row
    assert FirstLM(model=str(tiny_dir), routers="none", mask=111111).fixed.all()  # lm-eval parses 1111.. as an int
    with pytest.raises(ValueError, match="skip="):
        FirstLM(model=str(tiny_dir), routers="none", mask="uniform")
    with pytest.raises(ValueError, match="mask must be"):
        FirstLM(model=str(tiny_dir), routers="none", mask="sometimes")
    lm = FirstLM(model=str(tiny_dir), routers="none", mask="uniform", skip=2)
    assert int((~lm.fixed).sum()) == 2 and bool(lm.fixed[0]) and bool(lm.fixed[-1])


@torch.no_grad()
def test_routers_decide_from_the_context_only(routed):
    """loglikelihood: the mask is the routers' decision on the context alone (the same for every continuation,
    and what FirstModel decides on a context-only prefill); the continuation is scored under it.
    generate_until: the prompt's prefill decision, frozen; output = FirstModel.generate's greedy tokens."""
    torch.set_num_threads(1)
    lm = FirstLM(model=routed, batch_size=2)
    tok = lm.tokenizer
    seen = set()
    for i, ctx_text in enumerate(["Paris is the capital of", "A quick brown fox", "zzz 123 ??", "Hello there, how"]):
        reqs = [_req(ctx_text, " France", 10 * i), _req(ctx_text, " something much longer here", 10 * i + 1)]
        got = lm.loglikelihood(reqs, disable_tqdm=True)
        ctx = lm.tok_encode(ctx_text)
        decided = routed.decide_mask(torch.tensor(ctx))
        assert lm.mask_log[("unit", 10 * i)] == decided == lm.mask_log[("unit", 10 * i + 1)]
        seen.add(tuple(decided))
        for req, (ll, _) in zip(reqs, got, strict=True):
            full = lm.tok_encode(req.args[0] + req.args[1])
            logp = torch.log_softmax(routed.forward(torch.tensor([full]), mask=decided).logits[0].float(), -1)
            ref = sum(float(logp[j - 1, full[j]]) for j in range(len(ctx), len(full)))
            assert ll == pytest.approx(ref, abs=1e-4)
    assert len(seen) > 1  # the random routers really decide per context
    # generation: decided at prefill on the prompt, frozen for every new token
    from lm_eval.api.instance import Instance

    prompt = "Paris is the capital of"
    req = Instance("generate_until", {}, (prompt, {"until": ["\n\n"], "max_gen_toks": 8, "do_sample": False}), 0,
                   ("gen", 0, 1))
    (text,) = lm.generate_until([req], disable_tqdm=True)
    ids = torch.tensor([tok(prompt).input_ids])
    out, used = routed.generate(ids, max_new_tokens=8, return_mask=True)
    assert lm.mask_log[("gen", 0)] == used[0].tolist() == routed.decide_mask(ids)
    assert text == tok.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True).split("\n\n")[0]
    # rolling: the first `rolling_prompt` tokens decide for the whole document
    doc = "The tower is 324 metres tall. " * 8
    (ll,) = lm.loglikelihood_rolling([_req(doc, None, 5, "loglikelihood_rolling")], disable_tqdm=True)
    toks = lm.tok_encode(doc)
    decided = routed.decide_mask(torch.tensor([[lm.prefix_token_id] + toks][0][:64]))
    assert lm.mask_log[("unit", 5)] == decided and lm.rolling_tokens[("unit", 5)] == len(toks)
    full = [lm.prefix_token_id] + toks
    logp = torch.log_softmax(routed.forward(torch.tensor([full]), mask=decided).logits[0].float(), -1)
    assert ll == pytest.approx(sum(float(logp[j - 1, full[j]]) for j in range(1, len(full))), abs=1e-3)


def test_local_task_configs_run_end_to_end_offline(tiny_dir, tmp_path):
    """YAML + JSONL written by lm_eval_tasks, loaded by lm-eval's own YAML loader, `--model firstkit` by name,
    with every network connection refused."""
    user = tmp_path / "mine.jsonl"
    user.write_text("\n".join(json.dumps({"query": f"{i} plus one is", "choices": [str(i + 1), str(i + 5)],
                                          "gold": 0}) for i in range(3)) + "\n")
    out = tmp_path / "tasks"
    for task, split in ((TASKS["copa"], "test"), (task_from_file(user, "mc"), None), (TASKS["xsum"], "test")):
        lt.write_yaml(lt.prepare(task, split, None, out / "data", functions=False), out / f"{task.name}.yaml")
    script = textwrap.dedent(f"""
        import json, socket
        def refuse(*a, **k):
            raise OSError("network access during an offline evaluation")
        socket.socket.connect = refuse
        socket.create_connection = refuse
        from lm_eval import simple_evaluate
        from lm_eval.tasks import TaskManager
        from lm_eval.tasks._yaml_loader import load_yaml
        cfgs = [load_yaml("{out}/" + n + ".yaml", resolve_func=True) for n in ("copa", "mine", "xsum")]
        res = simple_evaluate(model="firstkit", model_args="model={tiny_dir},routers=none,mask=all,max_length=128",
                              tasks=cfgs, limit=3, bootstrap_iters=0, task_manager=TaskManager(include_defaults=False))
        print(json.dumps({{k: {{m: v for m, v in r.items() if m in ("acc,none", "rougeL,none")}}
                          for k, r in res["results"].items()}}))
    """)
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "hfcache")}
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(res) == {"firstkit_copa", "firstkit_mine", "firstkit_xsum"}
    assert 0.0 <= res["firstkit_mine"]["acc,none"] <= 1.0 and "rougeL,none" in res["firstkit_xsum"]
    text = (out / "copa.yaml").read_text()
    assert "dataset_path: json" in text and "!function firstkit.evaluation.lm_eval_tasks.check_docs" in text


@pytest.mark.slow
def test_plain_lm_eval_cli_finds_firstkit(tiny_dir, tmp_path):
    """`lm_eval --model firstkit --tasks <firstkit yaml>` with lm-eval's own CLI (indexes its 10k tasks: slow)."""
    out = tmp_path / "tasks"
    lt.write_yaml(lt.prepare(TASKS["copa"], "test", None, out / "data", functions=False), out / "copa.yaml")
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run(["lm_eval", "--model", "firstkit", "--model_args", f"model={tiny_dir},routers=none,mask=all",
                        "--tasks", str(out / "copa.yaml"), "--limit", "2", "--device", "cpu"],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "firstkit_copa" in r.stdout and "acc" in r.stdout


def test_entry_point_declared():
    from importlib.metadata import entry_points

    eps = {ep.name: ep.value for ep in entry_points(group="lm_eval.models")}
    assert eps.get("firstkit") == "firstkit.evaluation.lm_eval_model:FirstLM"
    load_entry_points()  # idempotent with the import-time registration
    from lm_eval.api.registry import get_model

    assert get_model("firstkit") is FirstLM and get_model("hf").__name__ == "HFLM"


def test_metric_values_agree_with_reference_libraries():
    import sacrebleu
    from lm_eval.api.metrics import bits_per_byte, chrf, weighted_perplexity
    from rouge_score import rouge_scorer

    from firstkit.evaluation.harness import aggregation

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    doc = {"references": ["Police officers said the fire started today.", "A fire started."]}
    pred = "The police said a fire was started"
    ref = max(scorer.score(r, pred)["rougeL"].fmeasure for r in doc["references"])
    assert lt.process_rouge(doc, [pred])["rougeL"] == pytest.approx(ref)
    # SQuAD v1.1 official EM / F1 on hand-made answers
    sq = lt.process_squad({"references": ["Denver Broncos", "the Broncos"]}, [" The Denver Broncos!\n"])
    assert sq == {"f1": 1.0, "em": 1.0}
    sq = lt.process_squad({"references": ["Denver Broncos"]}, ["Denver"])
    assert sq["em"] == 0.0 and sq["f1"] == pytest.approx(2 / 3)
    assert lt.squad_f1("", [""]) == 1.0 and lt.squad_f1("", ["x"]) == 0.0
    # chrF / BLEU: lm-eval's corpus aggregations over the pass-through items = sacreBLEU on the corpus
    hyps, refs = ["the cat sat on a mat", "hello world"], ["the cat sat on the mat", "hello there world"]
    items = [lt.process_translation({"references": [r]}, [h])["chrf"] for h, r in zip(hyps, refs, strict=True)]
    assert chrf(items) == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score)
    assert aggregation("chrf")(items) == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score / 100)
    assert aggregation("bleu")(items) == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score / 100)
    # perplexities: exp(-sum ll / sum weight); bits per byte: -sum ll / sum bytes / ln 2
    pp = [(-10.0, 4), (-2.0, 2)]
    assert weighted_perplexity(pp) == pytest.approx(2.718281828 ** 2) == aggregation("perplexity")(pp)
    assert bits_per_byte(pp) == pytest.approx(2 / 0.6931471805599453)


def test_statistics_on_known_values():
    iv = stats.mean_interval([1, 0, 1, 1, 0, 1, 1, 1])  # 6 / 8 correct: Wilson interval
    assert iv.value == 0.75 and iv.method == "wilson"
    assert iv.low == pytest.approx(0.4093, abs=1e-4) and iv.high == pytest.approx(0.9285, abs=1e-4)
    iv = stats.mean_interval([0.2, 0.4, 0.6])
    assert iv.value == pytest.approx(0.4) and iv.stderr == pytest.approx(0.2 / 3 ** 0.5)
    assert iv.high - iv.value == pytest.approx(4.302653 * iv.stderr, rel=1e-5)  # t(0.975, 2)
    d = stats.difference([1, 1, 0, 1], [0, 1, 0, 0], None)
    assert d.value == 0.5 and d.method == "paired t" and d.stderr == pytest.approx((1 / 3) ** 0.5 / 2)
    a = [(-1.0, 1), (-2.0, 1), (-3.0, 1), (-1.5, 1)]
    from lm_eval.api.metrics import weighted_perplexity

    b = stats.bootstrap_interval(a, weighted_perplexity, iters=200, seed=1)
    assert b.low <= b.value <= b.high and b.stderr > 0
    same = stats.difference(a, a, weighted_perplexity, iters=50)
    assert same.value == 0 and same.low == same.high == 0  # paired: identical systems never differ
    assert stats.chance_level([2, 2, 4, 4], [0, 1, 0, 0]) == {"chance": 0.375, "majority": 0.75}


@torch.no_grad()
def test_bundle_scores_like_its_eager_model(tmp_path):
    """bundle=DIR: the exported (fp32) program, its routers deciding in its own prefill, scores what the eager
    FirstModel it was exported from scores, with the same masks; first-eval splits bundle scores into
    quantization (bundle - eager) and skipping (bundle - bundle-all). Shares the export tests' tiny bundle."""
    from click.testing import CliRunner
    from test_export_support import load_reference, tiny_bundle, tiny_folders

    from firstkit.evaluation.cli import main as eval_main

    torch.set_num_threads(1)
    bundle, _ = tiny_bundle("llama")
    ref = load_reference("llama")
    blm = FirstLM(bundle=str(bundle))
    elm = FirstLM(model=ref, max_length=blm.max_length)
    assert type(blm).__name__ == "BundleLM" and blm.max_length == 24
    reqs = [_req(c, x, i) for i, (c, x) in enumerate([("ab cd", " ef"), ("ab cd", " xyz"), ("The cat", " sat."),
                                                       ("0123456789 abcdefgh", " ijklmnop")])]  # last: truncated
    got, want = blm.loglikelihood(reqs, disable_tqdm=True), elm.loglikelihood(reqs, disable_tqdm=True)
    for (a, ga), (b, gb) in zip(got, want, strict=True):
        assert a == pytest.approx(b, abs=1e-3) and ga == gb
    assert blm.mask_log == elm.mask_log
    from lm_eval.api.instance import Instance

    gen = [Instance("generate_until", {}, ("hello", {"until": ["\n"], "max_gen_toks": 6, "do_sample": False}), 0,
                    ("g", 0, 1))]
    assert blm.generate_until(gen, disable_tqdm=True) == elm.generate_until(gen, disable_tqdm=True)
    assert blm.mask_log[("g", 0)] == elm.mask_log[("g", 0)]
    forced = FirstLM(bundle=str(bundle), mask="1" * ref.num_layers)
    assert forced.loglikelihood(reqs[:1], disable_tqdm=True)[0][0] == pytest.approx(
        FirstLM(model=ref, mask="all").loglikelihood(reqs[:1], disable_tqdm=True)[0][0], abs=1e-3)
    # first-eval --bundle
    short = tmp_path / "short.jsonl"
    short.write_text("".join(json.dumps({"query": f"{i}+1=", "choices": [str(i + 1), str(i + 5)], "gold": 0}) + "\n"
                             for i in range(5)))
    model_dir, router_dir = tiny_folders("llama")
    r = CliRunner().invoke(eval_main, ["--model", str(model_dir), "--routers", str(router_dir), "--bundle", str(bundle),
                                       "--task-file", str(short), "--task-type", "mc", "--systems",
                                       "base,first,bundle,bundle-all", "--limit", "5", "--json", "--quiet"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    rows = {(x["system"], x["metric"]): x for x in rep["results"]}
    assert rows[("bundle", "accuracy")]["score"] == rows[("first", "accuracy")]["score"]
    assert rows[("bundle-all", "accuracy")]["skip_ratio"] == 0.0
    pairs = {(d["system"], d["reference"], d["reference_system"]) for d in rep["differences"]}
    assert {("bundle", "eager", "first"), ("bundle", "all_layers", "bundle-all")} <= pairs
    assert rep["mask_agreement"] == [{"system": "bundle", "reference_system": "first", "task": "short",
                                      "masks_equal": 1.0, "n": 5}]
