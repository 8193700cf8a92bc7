"""EagleEye search: FLOPs window, both samplers (the paper's uniform draw-then-filter and scaled), determinism,
adaptive BN on the candidate path, resume, 2-process gloo sharding, fine-tuning the result, one-line errors for
bad input."""
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
from compress.prune import eagleeye as ee
from compress.prune.eagleeye import FlopsWindowSampler, full_width_share, strategy_stats
from compress.prune.plan import round_keep_array
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


def check_strategies(cg, imgsz, ratio, delta, lo, hi, rt, n, sampler="uniform"):
    s = FlopsWindowSampler(cg, imgsz, ratio, delta, lo, hi, rt, sampler)
    cm = cg.cost_model(imgsz)
    base = cm.macs()
    strategies = [s.sample(0, i) for i in range(n)]
    if sampler == "uniform":  # draw-then-filter: every strategy is inside, after one or more draws
        assert all(st.in_window for st in strategies) and all(st.draws >= 1 for st in strategies)
    else:
        assert np.mean([st.in_window for st in strategies]) >= 0.95 and all(st.draws == 1 for st in strategies)
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


@pytest.mark.parametrize("sampler", ["uniform", "scaled"])
@pytest.mark.parametrize("ratio,delta,lo,hi,rt,imgsz", [
    (0.6, 0.02, 0.2, 1.0, 8, 640), (0.3, 0.01, 0.1, 0.9, 8, 320), (0.8, 0.005, 0.5, 1.0, 16, 640),
])
def test_every_candidate_in_flops_window_yolov5n(ratio, delta, lo, hi, rt, imgsz, sampler):
    cg = channel_groups("yolov5n.yaml")  # full width, cost model only: no model is built
    check_strategies(cg, imgsz, ratio, delta, lo, hi, rt, 150, sampler)


def test_window_tiny_model_and_strategy_depends_only_on_seed_and_index():
    cg = channel_groups(tiny_cfg())
    st = check_strategies(cg, 96, 0.6, 0.02, 0.2, 1.0, 8, 60)
    fresh = FlopsWindowSampler(cg, 96, 0.6, 0.02, 0.2, 1.0, 8)
    assert fresh.sample(0, 17) == st[17]  # no hidden state carried from earlier candidates
    assert fresh.sample(1, 17).counts != st[17].counts
    # excluded groups are never pruned
    s = FlopsWindowSampler(cg.exclude(["0", "model.9"]), 96, 0.6, 0.03, 0.2, 1.0, 8)
    assert "model.0" not in s.names and "model.9.cv1" not in s.names


def test_uniform_strategy_depends_only_on_seed_and_index_not_order_or_chunks(monkeypatch):
    cg = channel_groups(tiny_cfg())
    s = FlopsWindowSampler(cg, 96, 0.6, 0.02, 0.2, 1.0, 8)
    forward = [s.sample(3, i) for i in range(40)]
    backward = [FlopsWindowSampler(cg, 96, 0.6, 0.02, 0.2, 1.0, 8).sample(3, i) for i in reversed(range(40))]
    assert forward == backward[::-1]
    assert len({st.draws for st in forward}) > 3  # draws differ: strategies are filtered, not placed
    # a strategy found at the first draw is exactly the rounded first ratio vector of (seed, i)
    one = [st for st in forward if st.draws == 1]
    assert one and all(list(st.counts.values()) == list(s.counts_of(s.ratios(3, st.index))) for st in one)
    # the vectorised chunks are an implementation detail: one draw at a time finds the same strategies
    monkeypatch.setattr(ee, "CHUNKS", (1,))
    assert [s.sample(3, i) for i in range(40)] == forward


def uniform_reference(cg, imgsz, ratio, delta, lo, hi, rt, draws, seed=123):
    """Pure U(lo, hi) draws rounded like the sampler, kept when inside the window: their kept counts."""
    groups = cg.prunable
    sizes = np.array([g.size for g in groups])
    cm = cg.cost_model(imgsz)
    counts = round_keep_array(np.random.default_rng(seed).uniform(lo, hi, (draws, len(groups))) * sizes, sizes, rt)
    X = np.repeat(cm.full[None], draws, 0)
    X[:, [g.index for g in groups]] = counts
    kept = cm.macs_batch(X) / cm.macs()
    return [dict(zip((g.name for g in groups), c)) for c in counts[np.abs(kept - ratio) <= delta]]


def test_uniform_full_width_share_matches_pure_uniform_draws_and_is_below_scaled():
    cg = channel_groups("yolov5n.yaml")
    cfg = (640, 0.6, 0.02, 0.2, 1.0, 8)
    uni, scaled = (FlopsWindowSampler(cg, *cfg, sampler=k) for k in ("uniform", "scaled"))
    ref = uniform_reference(cg, *cfg, draws=200_000)
    assert len(ref) > 100
    st_u, st_s = strategy_stats(uni, 0, 200), strategy_stats(scaled, 0, 200)
    ref_share = full_width_share(uni, ref)
    assert abs(st_u["full_width"] - ref_share) < 0.03, (st_u["full_width"], ref_share)
    assert st_s["full_width"] > st_u["full_width"] + 0.1  # scale-and-clip piles groups up at full width
    assert st_u["share"] == 1.0 and st_u["draws_per_strategy"] > 100 and st_s["draws_per_strategy"] == 1
    assert st_u["acceptance"] == pytest.approx(len(ref) / 200_000, rel=0.3)


@pytest.mark.parametrize("cfg,imgsz", [("yolov5n", 256), ("yolov5s", 640), ("shufflenetv2-yolov5", 320)])
def test_shipped_recipe_windows_are_reachable_by_uniform_draws(cfg, imgsz):
    """The demo and shipped recipes search at --remain-ratio 0.6 +- 0.02 with U(0.2, 1): yolov5s only just."""
    s = FlopsWindowSampler(channel_groups(f"{cfg}.yaml"), imgsz, 0.6)
    assert all(s.sample(0, i).in_window for i in range(3))


def test_unreachable_window_is_a_user_error_with_the_reachable_range(monkeypatch):
    cg = channel_groups(tiny_cfg())
    # all groups at --min-remain 0.1 go below 0.29, but uniform draws concentrate far above it
    with pytest.raises(UserError, match=r"--remain-ratio 0.3 \+- --delta 0.01 is out of reach of uniform draws: "
                                        r"0 of 1000000 draws .* FLOPs ratio spans (\d+\.\d)%\.\.(\d+\.\d)%.*"
                                        r"widen --delta, move --min-remain/--max-remain down") as e:
        FlopsWindowSampler(cg, 96, 0.3, 0.01, 0.1, 0.9, 8)
    lo, hi = map(float, e.value.args[0].split("spans ")[1].split("%)")[0].split("%.."))
    assert 31 < lo < hi < 100
    assert FlopsWindowSampler(cg, 96, 0.3, 0.01, 0.1, 0.9, 8, "scaled").sample(0, 0).in_window
    with pytest.raises(UserError, match=r"0 of 1000 draws .* move --min-remain/--max-remain up"):
        FlopsWindowSampler(cg, 96, 0.75, 0.005, 0.2, 1.0, 8, max_draws=1000)
    # a candidate that runs out of draws says so too (here the bound is made tiny on purpose)
    monkeypatch.setattr(ee, "PROBE_HITS", 1)
    s = FlopsWindowSampler(cg, 96, 0.6, 0.02, 0.2, 1.0, 8, max_draws=25)
    with pytest.raises(UserError, match=r"candidate \d+: --remain-ratio 0.6 \+- --delta 0.02 is out of reach of its "
                                        r"draws: 0 of 25 draws"):
        for i in range(100):
            s.sample(0, i)


def test_unknown_sampler_is_a_user_error(synth_data):
    with pytest.raises(UserError, match="--sampler paper: choose one of uniform, scaled"):
        EagleEyeOptions(data=str(synth_data), cfg=tiny_cfg(), remain_ratio=0.6, sampler="paper").validate()
    with pytest.raises(UserError, match="--sampler paper: choose one of uniform, scaled"):
        FlopsWindowSampler(channel_groups(tiny_cfg()), 96, 0.6, sampler="paper")


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
    """A straight 6-candidate search, a 3-candidate one resumed to 6, and a 3-candidate --sampler scaled one."""
    root = tmp_path_factory.mktemp("ee")
    common = ["eagleeye", "--cfg", str(tiny_cfg_file), "--data", str(synth_data), *SEARCH]
    assert main([*common, "--candidates", "6", "--out", str(root / "a")]) == 0
    assert main([*common, "--candidates", "3", "--out", str(root / "b")]) == 0
    first3 = (root / "b" / "candidates.jsonl").read_text()
    with open(root / "b" / "candidates.jsonl", "a") as f:  # a line torn by a crash is dropped on resume
        f.write('{"index": 3, "seed": 0, "sta')
    assert main([*common, "--candidates", "6", "--out", str(root / "b"), "--resume"]) == 0
    assert main([*common, "--candidates", "3", "--sampler", "scaled", "--out", str(root / "scaled")]) == 0
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
    assert all(isinstance(r["draws"], int) and r["draws"] >= 1 for r in recs) and max(r["draws"] for r in recs) > 1
    rep = json.loads((a / "report.json").read_text())
    assert rep["sampler"] == rep["options"]["sampler"] == "uniform"
    assert rep["draws_per_candidate"] == pytest.approx(np.mean([r["draws"] for r in recs]))
    assert rep["acceptance"] == pytest.approx(6 / sum(r["draws"] for r in recs))
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


def test_scaled_sampler_search_records_it(runs):
    root, _, _ = runs
    recs = read_candidates(root / "scaled" / "candidates.jsonl")
    assert len(recs) == 3 and all(r["draws"] == 1 and 0.58 <= r["flops_ratio"] <= 0.62 for r in recs)
    rep = json.loads((root / "scaled" / "report.json").read_text())
    assert rep["sampler"] == "scaled" and rep["draws_per_candidate"] == 1
    assert json.loads((root / "scaled" / "search.json").read_text())["sampler"] == "scaled"
    # the first candidates of the two samplers differ (same seed, other rule)
    uni = read_candidates(root / "a" / "candidates.jsonl")
    assert [r["counts"] for r in recs] != [r["counts"] for r in uni[:3]]


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
    (["--remain-ratio", "0.3", "--delta", "0.01", "--min-remain", "0.1", "--max-remain", "0.9"],
     "is out of reach of uniform draws: 0 of 1000000 draws"),
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
    rc = main([*common, "--candidates", "6", "--sampler", "scaled", "--out", str(root / "a"), "--resume"])
    err = capsys.readouterr().err
    assert rc == 2 and "searched with --sampler 'uniform', not 'scaled'" in err and err.count("\n") == 1


def test_resume_of_a_search_from_before_the_sampler_option_needs_scaled(runs, capsys):
    root, _, common = runs
    old = root / "old"
    old.mkdir()
    saved = json.loads((root / "scaled" / "search.json").read_text())
    del saved["sampler"]  # what search.json held before --sampler: those searches were all scaled
    (old / "search.json").write_text(json.dumps(saved))
    rc = main([*common, "--candidates", "3", "--out", str(old), "--resume"])
    err = capsys.readouterr().err
    assert rc == 2 and "searched with --sampler 'scaled', not 'uniform'" in err
    assert main([*common, "--candidates", "3", "--sampler", "scaled", "--out", str(old), "--resume"]) == 0
    assert strip(read_candidates(old / "candidates.jsonl")) == strip(read_candidates(root / "scaled" /
                                                                                     "candidates.jsonl"))
