"""EagleEye search: FLOPs window, determinism, adaptive BN on the candidate path, resume, 2-process gloo
sharding, fine-tuning the result, one-line errors for bad input."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from compress.cli import main
from compress.errors import UserError
from compress.model.artifact import load_model
from compress.prune import apply_plan, channel_groups, plan_from_counts
from compress.prune.eagleeye import FlopsWindowSampler
from compress.stages.eagleeye import (
    CandidateScorer, EagleEyeOptions, load_search_model, make_scorer, read_candidates,
)

from conftest import tiny_cfg

SEARCH = ["--remain-ratio", "0.6", "--bn-batches", "2", "--eval-batches", "2", "--batch", "8", "--imgsz", "96",
          "--workers", "0", "--top-k", "3", "--round-to", "8"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread, as each torchrun rank here: equal numerics across runs, and faster on a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def strip(recs):
    """Records without what may differ between equal runs (timings, the rank that scored them)."""
    return sorted(({k: v for k, v in r.items() if k not in ("seconds", "rank")} for r in recs),
                  key=lambda r: r["index"])


def check_strategies(cg, imgsz, ratio, delta, lo, hi, rt, n):
    s = FlopsWindowSampler(cg, imgsz, ratio, delta, lo, hi, rt)
    cm = cg.cost_model(imgsz)
    base = cm.macs()
    strategies = [s.sample(0, i) for i in range(n)]
    assert np.mean([st.in_window for st in strategies]) >= 0.95
    sizes = {g.name: g.size for g in cg.prunable}
    for st in strategies:
        kept = cm.macs(st.counts) / base  # independently of the sampler's own vector arithmetic
        assert st.flops_ratio == pytest.approx(kept, rel=1e-9)
        if st.in_window:
            assert ratio - delta - 1e-9 <= kept <= ratio + delta + 1e-9
        for name, c in st.counts.items():
            size = sizes[name]
            assert c == size or c % rt == 0, (name, c)
            assert c <= size and (c >= min(rt, size)) and (c == size or c <= max(hi * size, rt))
    # batched cost == the cost model's own, and strategies differ from each other
    X = np.array([[st.counts[n] for n in s.names] for st in strategies[:8]])
    assert np.allclose(s.macs_many(X), [cm.macs(st.counts) for st in strategies[:8]], rtol=1e-12)
    assert len({tuple(sorted(st.counts.items())) for st in strategies}) > 0.9 * n
    return strategies


@pytest.mark.parametrize("ratio,delta,lo,hi,rt,imgsz", [
    (0.6, 0.02, 0.2, 1.0, 8, 640), (0.3, 0.01, 0.1, 0.9, 8, 320), (0.8, 0.005, 0.5, 1.0, 16, 640),
])
def test_every_candidate_in_flops_window_yolov5n(ratio, delta, lo, hi, rt, imgsz):
    cg = channel_groups("yolov5n.yaml")  # full width, cost model only: no model is built
    check_strategies(cg, imgsz, ratio, delta, lo, hi, rt, 150)


def test_window_tiny_model_and_strategy_depends_only_on_seed_and_index():
    cg = channel_groups(tiny_cfg())
    st = check_strategies(cg, 96, 0.6, 0.02, 0.2, 1.0, 8, 60)
    fresh = FlopsWindowSampler(cg, 96, 0.6, 0.02, 0.2, 1.0, 8)
    assert fresh.sample(0, 17) == st[17]  # no hidden state carried from earlier candidates
    assert fresh.sample(1, 17).counts != st[17].counts
    # excluded groups are never pruned
    s = FlopsWindowSampler(cg.exclude(["0", "model.9"]), 96, 0.6, 0.03, 0.2, 1.0, 8)
    assert "model.0" not in s.names and "model.9.cv1" not in s.names


def test_impossible_budget_is_a_user_error():
    cg = channel_groups(tiny_cfg())
    with pytest.raises(UserError, match="--min-remain 0.9 the model still keeps"):
        FlopsWindowSampler(cg, 96, 0.5, 0.02, 0.9, 1.0, 8)
    with pytest.raises(UserError, match="--max-remain 0.3 the model keeps only"):
        FlopsWindowSampler(cg, 96, 0.9, 0.02, 0.2, 0.3, 8)


def test_adaptive_bn_on_candidate_path_changes_statistics_not_weights(synth_data):
    torch.manual_seed(0)
    o = EagleEyeOptions(data=str(synth_data), cfg=tiny_cfg(), remain_ratio=0.6, imgsz=96, batch=8, bn_batches=2,
                        eval_batches=1)
    inp, data, sampler = load_search_model(o)
    model, cg = inp.model, inp.groups
    scorer = make_scorer(o, inp, data)
    assert isinstance(scorer, CandidateScorer)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    counts = sampler.sample(0, 3).counts
    _, ref = apply_plan(cg, before, plan_from_counts(cg, counts, scorer.scores))
    cand, res = scorer.score(counts)
    assert not cand.training and 0 <= res["map50"] <= 1
    sd = cand.state_dict()
    params = {k for k, _ in cand.named_parameters()}
    assert all(torch.equal(sd[k], ref[k]) for k in params)  # weights: exactly the index-selected ones
    stats = [k for k in sd if k.endswith(("running_mean", "running_var"))]
    assert stats and all(not torch.equal(sd[k], ref[k]) for k in stats)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # base model untouched
    assert all(torch.equal(v, before[k]) for k, v in scorer.sd.items())


@pytest.fixture(scope="module")
def runs(tmp_path_factory, synth_data, tiny_cfg_file):
    """A straight 6-candidate search, and a 3-candidate one resumed to 6."""
    root = tmp_path_factory.mktemp("ee")
    common = ["eagleeye", "--cfg", str(tiny_cfg_file), "--data", str(synth_data), *SEARCH]
    assert main([*common, "--candidates", "6", "--out", str(root / "a")]) == 0
    assert main([*common, "--candidates", "3", "--out", str(root / "b")]) == 0
    first3 = (root / "b" / "candidates.jsonl").read_text()
    with open(root / "b" / "candidates.jsonl", "a") as f:  # a line torn by a crash is dropped on resume
        f.write('{"index": 3, "seed": 0, "sta')
    assert main([*common, "--candidates", "6", "--out", str(root / "b"), "--resume"]) == 0
    return root, first3, common


def test_search_outputs_and_report(runs):
    root, _, _ = runs
    a = root / "a"
    for f in ("model.yaml", "weights.pt", "report.json", "candidates.jsonl", "search.json", "scatter.png",
              "channels.png", "top/1/weights.pt", "top/3/report.json"):
        assert (a / f).is_file(), f
    assert not (a / "top" / "4").exists()
    assert (a / "scatter.png").read_bytes()[:4] == b"\x89PNG"
    recs = read_candidates(a / "candidates.jsonl")
    assert [r["index"] for r in recs] == list(range(6))
    assert all(r["status"] == "ok" and 0.58 <= r["flops_ratio"] <= 0.62 for r in recs)
    rep = json.loads((a / "report.json").read_text())
    best = max(recs, key=lambda r: (r["map50"], r["map"], -r["index"]))
    assert rep["candidate"] == best["index"] and rep["map50"] == best["map50"] and rep["map"] == best["map"]
    assert rep["evaluated_share"] == 1.0 and rep["sampled"] == 6 and rep["seconds_per_candidate"] > 0
    assert rep["stage"] == "eagleeye" and rep["options"]["remain_ratio"] == 0.6
    assert rep["gflops"] == pytest.approx(rep["flops_ratio"] * rep["gflops_before"])
    assert [t["candidate"] for t in rep["top"]][0] == best["index"] and len(rep["top"]) == 3
    m = load_model(a)
    from compress.model.profile import profile

    prof = profile(m, 96)
    assert prof["params"] == rep["params"] and prof["gflops"] == pytest.approx(rep["gflops"], rel=1e-9)
    # the artifact holds the BN-recalibrated weights: it scores what the search recorded
    o = EagleEyeOptions(data=rep["options"]["data"], cfg=rep["options"]["cfg"], remain_ratio=0.6, imgsz=96, batch=8,
                        bn_batches=2, eval_batches=2)
    inp, data, _ = load_search_model(o)
    scorer = make_scorer(o, inp, data)
    assert scorer.evaluate(m)["map50"] == pytest.approx(rep["map50"], abs=1e-9)
    top1 = torch.load(a / "top" / "1" / "weights.pt", weights_only=True)
    best_w = torch.load(a / "weights.pt", weights_only=True)
    assert all(torch.equal(top1[k], best_w[k]) for k in best_w)


def test_determinism_and_resume(runs):
    root, first3, _ = runs
    a = read_candidates(root / "a" / "candidates.jsonl")
    b_text = (root / "b" / "candidates.jsonl").read_text()
    b = read_candidates(root / "b" / "candidates.jsonl")
    # two runs of the same seed: identical records apart from timings
    assert strip(a[:3]) == strip(read_candidates_text(first3))
    # resume: 6 lines, the first 3 untouched, same result as the straight run
    assert len(b) == 6 and b_text.startswith(first3)
    assert strip(a) == strip(b)
    ra, rb = (json.loads((root / d / "report.json").read_text()) for d in "ab")
    assert ra["candidate"] == rb["candidate"] and ra["top"] == rb["top"]
    wa = torch.load(root / "a" / "weights.pt", weights_only=True)
    wb = torch.load(root / "b" / "weights.pt", weights_only=True)
    assert all(torch.allclose(wa[k].float(), wb[k].float(), atol=1e-6) for k in wa)


def read_candidates_text(text):
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_search_matches_one_process(runs):
    root, _, common = runs
    env = dict(os.environ, OMP_NUM_THREADS="1")
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
            str(free_port()), "-m", "compress.cli", *common, "--candidates", "6", "--out", str(root / "ddp")]
    p = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    d = read_candidates(root / "ddp" / "candidates.jsonl")
    assert {r["rank"] for r in d} == {0, 1} and all(r["rank"] == r["index"] % 2 for r in d)
    assert strip(d) == strip(read_candidates(root / "a" / "candidates.jsonl"))
    ra, rd = (json.loads((root / x / "report.json").read_text()) for x in ("a", "ddp"))
    assert rd["candidate"] == ra["candidate"] and rd["top"] == ra["top"] and rd["world_size"] == 2
    assert p.stdout.count("top 3 of 6 evaluated candidates") == 1  # only rank 0 writes and prints


def test_best_artifact_fine_tunes(runs, synth_data, tmp_path):
    root, _, _ = runs
    rc = main(["train", "--weights", str(root / "a"), "--data", str(synth_data), "--epochs", "1", "--imgsz", "96",
               "--batch", "8", "--workers", "0", "--out", str(tmp_path / "ft")])
    assert rc == 0
    rep = json.loads((tmp_path / "ft" / "report.json").read_text())
    assert rep["parent"] == str(root / "a") and "map50" in rep
    assert load_model(tmp_path / "ft").yaml == load_model(root / "a").yaml  # same pruned architecture


@pytest.mark.parametrize("args,msg", [
    (["--remain-ratio", "0"], "--remain-ratio 0.0: must be in (0, 1]"),
    (["--remain-ratio", "1.5"], "--remain-ratio 1.5: must be in (0, 1]"),
    (["--remain-ratio", "0.6", "--min-remain", "0.8", "--max-remain", "0.5"], "--min-remain 0.8 is larger"),
    (["--remain-ratio", "0.6", "--delta", "0"], "--delta 0.0: must be > 0"),
    (["--remain-ratio", "0.6", "--delta", "-0.1"], "--delta -0.1: must be > 0"),
    (["--remain-ratio", "0.6", "--candidates", "0"], "--candidates 0: must be a positive integer"),
    (["--remain-ratio", "0.1", "--min-remain", "0.6"], "is out of reach"),
    (["--remain-ratio", "0.9", "--max-remain", "0.4"], "is out of reach"),
    (["--remain-ratio", "0.6", "--exclude", "99"], "--exclude 99"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, synth_data, tiny_cfg_file, capsys, args, msg):
    rc = main(["eagleeye", "--cfg", str(tiny_cfg_file), "--data", str(synth_data), "--imgsz", "96",
               "--out", str(tmp_path / "x"), *args])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("compress eagleeye: error: ") and msg in err and err.count("\n") == 1
    assert not (tmp_path / "x").exists()


def test_resume_with_other_options_is_refused(runs, capsys):
    root, _, common = runs
    rc = main([*common, "--candidates", "6", "--delta", "0.03", "--out", str(root / "a"), "--resume"])
    err = capsys.readouterr().err
    assert rc == 2 and "--delta 0.02" in err and err.count("\n") == 1
