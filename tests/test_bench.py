"""Smoke test: the benchmark runs end to end on tiny shapes.

No timing assertions: only that every case, peer, metric and output file
is produced, and that the overflow check tells the naive formulas apart.
"""

import contextlib
import io
import json
import pathlib

import jax
import numpy as np
import pytest

from bench import (
    _plumbing,
    cases,
    cli,
    memory,
    options,
    post,
    report,
    sizes,
    tiles,
    timing,
)
from bench.peers import FNS, HEADS
from jsoft import _compat


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  out = tmp_path_factory.mktemp("bench")
  # --quick's short samples, on the tiny shapes.
  payload = cli.main(["--quick", "--shapes", "tiny", "--lm-head", "tiny",
                      "--lce", "tiny", "--dtype", "float32", "--rounds", "2",
                      "--json", str(out / "r.json"), "--plot",
                      str(out / "r.png")])
  return payload, out


def test_every_case_runs(run):
  payload, _ = run
  names = [c["name"] for c in payload["cases"]]
  # fwd and vg of each function, one LM head, one fused head.
  assert len(names) == 2 * (len(FNS) - len(HEADS)) + len(HEADS)
  assert "ce_int_4x5_float32_vg" in names
  assert "ce_opts_4x5_float32_vg" in names
  assert "lm_head_4x3x5_float32_vg" in names
  assert "lce_6x3x5_float32_vg" in names
  assert "distill_6x3x5_float32_vg" in names


def test_metrics_per_implementation(run):
  payload, _ = run
  for case in payload["cases"]:
    jsoft, floor = case["results"]["jsoft"], case["results"]["floor"]
    keys = ["median_ms", "p25_ms", "p75_ms", "compile_ms", "temp_bytes",
            "output_bytes", "ratio_to_floor"]
    if case["fn"] not in ("lce", "distill"):  # fused: no eager timing
      keys.append("eager_ms")
    for key in keys:
      assert key in jsoft, (case["name"], key)
    assert jsoft["median_ms"] > 0 and floor["median_ms"] > 0
    assert jsoft["finite_on_extremes"] is True
    for peer, r in case["results"].items():
      if peer not in ("jsoft", "floor", "floor, in place"):
        assert r["ratio_to_jsoft"] > 0


def test_naive_formulas_overflow(run):
  payload, _ = run
  ce = next(c for c in payload["cases"] if c["name"] ==
            "ce_int_4x5_float32_fwd")
  assert ce["results"]["naive-jnp"]["finite_on_extremes"] is False
  assert ce["results"]["naive-numpy"]["finite_on_extremes"] is False
  assert ce["results"]["optax"]["finite_on_extremes"] is True


def test_missing_peers_are_reported(run):
  payload, _ = run
  softmax = next(c for c in payload["cases"] if c["fn"] == "softmax")
  assert "optax" in softmax["missing"]  # optax has no softmax
  for case in payload["cases"]:
    assert "torch" in case["results"] or "torch" in case["missing"]


def test_outputs_written(run):
  payload, out = run
  on_disk = json.loads((out / "r.json").read_text())
  assert on_disk["machine"]["backend"] == "cpu"
  assert on_disk["machine"]["cores"] >= 1
  assert len(on_disk["cases"]) == len(payload["cases"])
  assert (out / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_only_and_bad_arguments(capsys):
  payload = cli.main(["--shapes", "tiny", "--dtype", "float32",
                      "--lm-head", "none", "--only", "sigmoid_4x5_float32_fwd",
                      "--rounds", "1", "--no-eager"])
  assert [c["name"] for c in payload["cases"]] == ["sigmoid_4x5_float32_fwd"]
  assert "sigmoid_4x5_float32_fwd" in capsys.readouterr().out
  with pytest.raises(SystemExit, match="unknown shape"):
    cli.main(["--shapes", "huge"])
  with pytest.raises(SystemExit, match="no case matches"):
    cli.main(["--shapes", "tiny", "--only", "nothing"])
  with pytest.raises(SystemExit):  # flags belong after the command
    cli.main(["--quick", "options"])


def test_default_run_is_the_representative_set():
  args = cli.parser().parse_args([])
  selected, config = cli.select(args)
  names = [c.name for c in selected]
  assert config["preset"] == "default"
  for name in ("ce_int_4096x32000_float32_fwd", "ce_int_4096x32000_float32_vg",
               "softmax_4096x32000_float32_fwd", "ce_prob_1024x1000_float32_vg",
               "bce_1024x1000_float32_vg", "ce_opts_1024x1000_float32_vg",
               "lm_head_2048x256x32000_float32_vg", "ce_int_8x10_float32_fwd",
               "ce_int_8x10_float32_vg"):
    assert name in names
  assert any(c.fn == "lce" for c in selected)
  assert len(names) < 20  # a few minutes, not the hour of --full
  # Only the 8x10 cases run the naive formulas, the eager call and the
  # overflow check.
  assert config["detail_shapes"] == ["small"]
  assert set(config["skip"]) == {"naive-jnp", "naive-numpy"}
  # --full is the whole grid; the grid flags pick from it.
  full, config = cli.select(cli.parser().parse_args(["--full"]))
  assert config["preset"] == "full"
  assert len(full) == len(cases.make_cases(
      FNS, ["small", "medium", "large"], ["float32", "bfloat16"], "full",
      "full"))
  _, config = cli.select(cli.parser().parse_args(["--shapes", "tiny"]))
  assert config["preset"] == "full"


def test_default_run_details_only_small_shapes():
  _, config = cli.select(cli.parser().parse_args(["--rounds", "1"]))
  available = cli.peers_available()
  tiny = cli.run_case(cases.Case("ce_int", (4, 5), "float32", "fwd"),
                      available, config)  # not a detail shape
  assert {"naive-jnp", "naive-numpy"} <= set(tiny["missing"])
  assert "eager_ms" not in tiny["results"]["jsoft"]
  assert "finite_on_extremes" not in tiny["results"]["jsoft"]
  small = cli.run_case(cases.Case("ce_int", (8, 10), "float32", "fwd"),
                       available, config)
  assert small["results"]["naive-jnp"]["finite_on_extremes"] is False
  assert small["results"]["jsoft"]["finite_on_extremes"] is True
  assert small["results"]["jsoft"]["eager_ms"] > 0


def test_calibrated_sample_lasts_the_minimum(monkeypatch):
  # A call that takes exactly 1 ms on a fake clock: autorange tries 1, 2, 5,
  # 10 calls; 10 are the first to last 10 ms.
  now = [0.0]
  monkeypatch.setattr(timing.time, "perf_counter", lambda: now[0])

  def call():
    now[0] += 1e-3

  _, number = timing.calibrated(call, 0.01)
  assert number == 10
  _, number = timing.calibrated(call, 0.0005)  # one call is long enough
  assert number == 1


def test_calibration_does_not_count_the_first_call(monkeypatch):
  # A jitted call's first call compiles: 1 s on the fake clock, then 1 ms
  # a call. Counted, the first call alone outlasts the minimum (1 call).
  now, calls = [0.0], []
  monkeypatch.setattr(timing.time, "perf_counter", lambda: now[0])

  def call():
    now[0] += 1.0 if not calls else 1e-3
    calls.append(1)

  _, number = timing.calibrated(call, 0.0095)  # (clear of rounding)
  assert number == 10


def test_table_helper_prints_every_cell(capsys):
  _plumbing.show(_plumbing.table("title", ["name", "value"],
                                 [["a", "1.5"], None, ["b", None]],
                                 caption="the caption"))
  out = capsys.readouterr().out
  for text in ("title", "name", "value", "a", "1.5", "b", "—", "the caption"):
    assert text in out


def test_missing_dependency_names_the_extra():
  with pytest.raises(_plumbing.Missing, match=r"\.\[bench\]"):
    _plumbing.optional("matplotlib_that_does_not_exist")
  assert _plumbing.why_missing("json") is None


def test_plot_command_redraws_a_saved_run(run, tmp_path):
  _, out = run
  cli.main(["plot", str(out / "r.json"), str(tmp_path / "again.png")])
  assert (tmp_path / "again.png").read_bytes()[:4] == b"\x89PNG"


def test_report_names_every_case_and_flags_overflow(run, capsys):
  payload, _ = run
  _plumbing.show(report.results_table(payload["cases"], 2))
  out = capsys.readouterr().out
  assert "peer ÷ jsoft" in out and "÷ floor" in out and "temp MiB" in out
  for case in payload["cases"]:
    assert case["name"] in out
  # The naive formulas overflow on the extremes (see above): said in words.
  assert "NO: NaN/inf" in out


def test_fused_head_case_compares_with_the_unfused(run):
  payload, _ = run
  lce = next(c for c in payload["cases"] if c["fn"] == "lce")
  assert {"jsoft", "jsoft-plain", "optax"} <= set(lce["results"])
  assert lce["max_rel_diff"] < 1e-5
  distill = next(c for c in payload["cases"] if c["fn"] == "distill")
  assert {"jsoft", "jsoft-plain", "optax"} <= set(distill["results"])
  assert distill["max_rel_diff"] < 1e-5


def test_sizes_runs_every_kernel_and_writes_the_heat_map(tmp_path,
                                                        monkeypatch, capsys):
  monkeypatch.setitem(sizes.GRIDS, "tiny", [(4, 5)])
  payload = cli.main(["sizes", "--quick", "--rounds", "1", "--dtype",
                      "float32", "--json", str(tmp_path / "s.json"),
                      "--plot", str(tmp_path / "s.png")])
  cells = {c["kernel"]: c for c in payload["cells"]}
  assert set(cells) == {*sizes.KERNELS, "fused head vg"}
  for kernel, (_, _, peer) in sizes.KERNELS.items():
    assert set(cells[kernel]["ratio"]) == {peer}
    assert cells[kernel]["ratio"][peer] > 0
  head = cells["fused head vg"]
  # tokamax is measured where it is installed, else reported missing.
  assert set(head["ratio"]) | set(payload["missing"]) == {"optax",
                                                          "tokamax"}
  out = capsys.readouterr().out
  assert "peer time ÷ jsoft time, float32" in out and "geomean" in out
  saved = json.loads((tmp_path / "s.json").read_text())
  assert saved["machine"]["jax"] == jax.__version__
  assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"


def test_sizes_second_look_pools_the_rounds_of_cells_off_either_side():
  # Seconds per round: jsoft 1.0 each time, the peer 0.8 (ratio 0.8, off
  # below), 1.2 (off above) or 1.0 (inside the band: not looked at again).
  def cell(peer):
    return sizes.summary({"jsoft": [1.0, 1.0, 1.0], "optax": peer})

  low, high, inside = cell([0.8] * 3), cell([1.2] * 3), cell([1.0] * 3)
  assert sizes.looks_off(low) and sizes.looks_off(high)
  assert not sizes.looks_off(inside)
  again = sizes.summary({"jsoft": [1.0, 2.0], "optax": [1.0, 2.0]})
  looked = sizes.second_look(low, again)
  # Five rounds pooled: ratios 0.8, 0.8, 0.8, 1.0, 1.0, median 0.8.
  assert looked["first_ratio"] == {"optax": pytest.approx(0.8)}
  assert looked["ratio"]["optax"] == pytest.approx(0.8)
  assert looked["seconds"]["jsoft"] == [1.0, 1.0, 1.0, 1.0, 2.0]
  assert looked["ms"]["jsoft"] == pytest.approx(1000.0)
  looked = sizes.second_look(low, sizes.summary(
      {"jsoft": [1.0] * 4, "optax": [1.0] * 4}))
  assert looked["ratio"]["optax"] == pytest.approx(1.0)  # 7 rounds: 4 at 1


def _show_options(saved):
  _plumbing.show(*options.tables(saved["options"]))


@pytest.mark.parametrize("name, show", [
    ("sizes_cpu", sizes.show),
    ("sweep_cpu", _show_options),
    ("options_cpu", _show_options),
])
def test_committed_text_is_the_committed_json(name, show):
  # A results table in text is drawn from its JSON: regenerated with it,
  # or stale (and a JSON the current tables cannot draw is stale too).
  results = pathlib.Path(__file__).parent.parent / "bench" / "results"
  saved = json.loads((results / f"{name}.json").read_text())
  with contextlib.redirect_stdout(io.StringIO()) as out:
    show(saved)
  committed = (results / f"{name}.txt").read_text()
  assert committed.startswith(out.getvalue())


def test_memory_sweep_writes_table_and_chart(tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(memory, "SWEEP_N", (8, 16, 32))
  monkeypatch.setattr(memory, "SWEEP_V", (8, 16, 32))
  monkeypatch.setattr(memory, "FIXED_N", 16)
  monkeypatch.setattr(memory, "FIXED_V", 16)
  monkeypatch.setattr(memory, "D", 4)
  result = cli.main(["memory", "--quick", "--json", str(tmp_path / "m.json"),
                     "--plot", str(tmp_path / "m.png")])
  assert set(result["over_n"]) >= {"jsoft fused", "jsoft unfused", "optax"}
  assert all(len(v) == 3 for v in result["over_v"].values())
  assert "jsoft fused" in capsys.readouterr().out
  saved = json.loads((tmp_path / "m.json").read_text())
  assert saved["memory_sweep"]["n"] == [8, 16, 32]
  assert (tmp_path / "m.png").read_bytes()[:4] == b"\x89PNG"


def test_tiles_table(tmp_path, capsys):
  result = cli.main(["tiles", "--quick", "--rounds", "1", "--json",
                     str(tmp_path / "t.json")])
  rows = result["results"]
  assert set(rows) == {"unfused"} | {tiles._name(*c) for c in tiles.QUICK}
  out = capsys.readouterr().out
  assert "tokens, 128" in out and "× unfused" in out
  assert json.loads((tmp_path / "t.json").read_text())["tiles"]["v"] == 4096
  assert list(rows)[-1] == "unfused"  # the baseline, listed last
  fused = {k: r for k, r in rows.items() if k != "unfused"}
  assert all(r["max_rel_difference"] < 1e-4 for r in fused.values())
  assert all(r["ratio_to_unfused"] > 0 for r in fused.values())
  assert "ratio_to_unfused" not in rows["unfused"]
  if _compat.JAX_VERSION < (0, 10, 2):
    pytest.skip("the rest passed; the temp shares need jax >= 0.10.2 (as "
                f"test_memory.py), this is jax {jax.__version__}")
  assert all(0 < r["temp_share"] < 1 for r in fused.values())


def test_options_sweep(tmp_path, capsys):
  result = cli.main(["options", "--quick", "--only", "sweep", "--rounds", "1",
                     "--json", str(tmp_path / "s.json"), "--plot",
                     str(tmp_path / "s.png")])
  assert set(result) == {"sweep"}  # --only sweep: no other section
  sweep = result["sweep"]
  shapes = [(s["n"], s["d"], s["v"]) for s in sweep["shapes"]]
  assert shapes == list(options.SWEEP_QUICK)
  heads = {(h.name, h.loop) for h in options.SWEEP_HEADS}
  assert heads == {("linear_cross_entropy", "tokens"),
                   ("linear_cross_entropy", "classes"),
                   ("linear_distillation_loss", "tokens")}
  # One row per head, shape and pattern; every kept fraction in each.
  assert len(sweep["rows"]) == len(heads) * len(shapes) * 2
  for row in sweep["rows"]:
    assert list(row["ratios"]) == [f"{k:g}" for k in options.KEPT]
    assert all(np.isfinite(x) and x > 0 for x in row["ratios"].values())
    assert row["ratios"]["1"] == 1.0  # the baseline
  assert {(r["head"], r["loop"], r["kept"]) for r in sweep["rows"]} == {
      (*h, p) for h in heads for p in ("first", "random")}
  assert len(sweep["overhead"]) == len(heads) * len(shapes)
  assert all(np.isfinite(r["ratio"]) and r["ratio"] > 0
             for r in sweep["overhead"])
  out = capsys.readouterr().out
  assert "kept-fraction sweep" in out and "k=0.05" in out
  assert "ignore_index set, nothing ignored" in out
  assert "training options" not in out
  saved = json.loads((tmp_path / "s.json").read_text())
  assert saved["options"]["sweep"]["kept"] == list(options.KEPT)
  assert saved["machine"]["backend"] == jax.default_backend()
  assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_kept_labels():
  y = np.arange(10, dtype=np.int32)
  rng = np.random.default_rng(0)
  first = options.kept_labels(y, 0.3, "first", rng)
  assert first.tolist() == [0, 1, 2] + [options.IGNORE] * 7
  random = options.kept_labels(y, 0.5, "random", rng)
  kept = random != options.IGNORE
  assert kept.sum() == 5 and (random[kept] == y[kept]).all()
  assert (options.kept_labels(y, 1.0, "random", rng) == y).all()


def test_options_table(tmp_path, capsys):
  result = cli.main(["options", "--quick", "--only", "options", "--only",
                     "head", "--rounds", "1", "--json",
                     str(tmp_path / "o.json")])
  assert "sweep" not in result
  assert set(result["results"]) == set(options.OPTIONS)
  assert list(result["results"])[-1] == "plain"  # the baseline, listed last
  for name, r in result["results"].items():
    assert (name == "plain") != (r.get("ratio_to_plain", 0) > 0), name
  out = capsys.readouterr().out
  for name in options.OPTIONS:
    assert name in out
  assert json.loads((tmp_path / "o.json").read_text())["options"]["n"] == 1024
  head = result["head"]["results"]
  assert set(head) == set(options._head_features(None, None))
  assert "stats, unused" in out and "75% ignored" in out
  if _compat.JAX_VERSION < (0, 10, 2):
    pytest.skip("the rest passed; the temp bound needs jax >= 0.10.2 (as "
                f"test_memory.py), this is jax {jax.__version__}")
  # No option stores the [N, C] logits (4 MB at 1024x1000 float32).
  assert all(r["temp_bytes"] < 4 * 1024 * 1000 / 8
             for r in result["results"].values())
  # Statistics left unused and ignored tokens add no memory to the head.
  for name in ("stats, unused", "75% ignored"):
    assert head[name]["temp_bytes"] <= 1.1 * head["plain"]["temp_bytes"]


def test_post_training_cases(tmp_path, capsys):
  result = cli.main(["post", "--quick", "--rounds", "1", "--json",
                     str(tmp_path / "p.json")])
  assert list(result) == list(post.SECTIONS)
  x = post.inputs(quick=True)
  for section, make in (("policy", post.policy_losses),
                        ("preference", post.preference_losses)):
    r = result[section]
    assert list(r["results"]) == ["ce_head", *make(x, "tokens")]
    for name, m in r["results"].items():
      assert (name == "ce_head") != ("ratio_to_ce_head" in m), name
      assert m["temp_bytes"] >= 0 and m["median_ms"] > 0
    assert r["max_rel_diff"] < 1e-5  # float32, fused against materialised
    assert [t["goal"] for t in r["targets"]] == [
        f"≤ {post.TARGETS[section]:.2f}", "≤ 1/16"]
    # Every peer computes the same loss (the textbook formula, jsoft's on
    # materialised logits, the fused head).
    values = {name: float(f(x["h"], x["w"])) for name, f in
              make(x, "tokens").items() if "entropy" not in name}
    np.testing.assert_allclose(list(values.values()),
                               values["jsoft-plain"], rtol=1e-5)
  out = capsys.readouterr().out
  assert "policy: value_and_grad" in out and "jsoft, entropy bonus" in out
  saved = json.loads((tmp_path / "p.json").read_text())
  assert saved["preference"]["sequences"] == post.QUICK[0]
  assert "machine" in saved
