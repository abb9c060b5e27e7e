"""The user model: the feature arrays of the serving path, the exported ONNX graph against torch,
and the scorer taking p from it (falling back to the profile blend without recent events)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from inference.catalog import CatalogIndex
from inference.scoring import Request, Scorer
from inference.user_model import TYPE_CODES, OnnxUserModel, event_arrays, load_user_model
from profiles.model import Profile
from streamrec.settings import Settings

T0 = 1_700_000_000_000


def _catalog(n: int = 40, dim: int = 16, seed: int = 0) -> CatalogIndex:
    m = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return CatalogIndex.from_arrays([f"i{k}" for k in range(n)], m, "test-vectors")


def test_event_arrays_pad_cut_and_skip_unknown_items() -> None:
    cat = _catalog()
    events = [
        [["i3", "purchase", T0 - 60_000], ["nope", "view", T0 - 120_000], ["i1", "view", T0 - 3_600_000]],
        [],
        [[f"i{k}", "click", T0 - k * 1000] for k in range(10)],
    ]
    a = event_arrays(events, [T0, T0, T0], cat.index_of, 4)
    assert a.idx.shape == (3, 4)
    assert a.idx[0].tolist() == [3, -1, 1, -1]  # unknown item: a masked slot, order kept
    assert a.mask[0].tolist() == [1, 0, 1, 0] and a.mask[1].sum() == 0
    assert a.types[0, 0] == TYPE_CODES["purchase"] and a.types[0, 2] == TYPE_CODES["view"]
    assert a.age[0, 0] == pytest.approx(np.log1p(1.0)) and a.age[0, 2] == pytest.approx(np.log1p(60.0))
    assert a.idx[2].tolist() == [0, 1, 2, 3]  # newest first, cut at n


def test_last_block_computes_only_the_first_token_with_the_same_numbers() -> None:
    """The tower's last block works on the query token alone: its output is the full block's
    first row (so serving it is the same model, with less work), gradients included."""
    torch = pytest.importorskip("torch")
    from inference.training.user_model import UserModelConfig, UserTower, _Block

    torch.manual_seed(0)
    blk = _Block(32, 4, 0.0).eval()
    x = torch.randn(5, 7, 32)
    keep = torch.ones(5, 7)
    keep[1, 4:] = 0.0  # padded slots
    full = blk(x, keep)
    first = blk(x, keep, first_only=True)
    assert first.shape == (5, 1, 32)
    torch.testing.assert_close(first[:, 0], full[:, 0], rtol=1e-5, atol=1e-6)
    (g_full,) = torch.autograd.grad(full[:, 0].sum(), blk.qkv.weight)
    (g_first,) = torch.autograd.grad(first[:, 0].sum(), blk.qkv.weight)
    torch.testing.assert_close(g_first, g_full, rtol=1e-4, atol=1e-6)
    # and the tower reads the first token of its last block only
    tower = UserTower(16, UserModelConfig(n_events=6, d_model=32, layers=2, heads=2)).eval()
    calls: list[bool] = []
    for b in tower.blocks:
        b.register_forward_hook(
            lambda m, a, kw, out: calls.append(kw.get("first_only", False)), with_kwargs=True
        )
    feeds = (torch.randn(3, 6, 16), torch.zeros(3, 6, dtype=torch.long), torch.zeros(3, 6), torch.ones(3, 6),
             torch.randn(3, 16), torch.ones(3, 1))  # fmt: skip
    p = tower(*feeds)
    assert calls == [False, True] and p.shape == (3, 16)


@pytest.fixture(scope="module")
def user_model_dir(tmp_path_factory) -> tuple[Path, CatalogIndex]:
    pytest.importorskip("torch")
    from inference.training.user_model import (
        ItemTable,
        TrainedUserModel,
        UserModelConfig,
        UserTower,
        export_user_model,
    )

    cat = _catalog()
    cfg = UserModelConfig(n_events=6, d_model=32, layers=2, heads=2)
    warm = np.zeros(len(cat.ids), np.float32)
    warm[:10] = 1.0
    table = ItemTable(cat.matrix, warm, "text+id", 0)
    with __import__("torch").no_grad():
        table.offset.normal_(0, 0.3)
    model = TrainedUserModel(UserTower(cat.dim, cfg), table, cfg, 20.0)
    folder = tmp_path_factory.mktemp("model")
    cat.save(folder / "catalog")
    export_user_model(model, cat, folder)
    return folder, model


def test_export_matches_torch_and_residuals_move_only_warm_items(user_model_dir) -> None:
    folder, model = user_model_dir
    cat = CatalogIndex.load(folder / "catalog")
    text = cat.matrix.copy()
    um = load_user_model(folder, cat, variant="fp32")
    assert um is not None
    np.testing.assert_allclose(
        cat.matrix, model.item_matrix(), atol=1e-5
    )  # unit(text + offset) for warm ones
    assert not np.allclose(cat.matrix[:10], text[:10]) and np.allclose(cat.matrix[10:], text[10:])
    events = [[[f"i{k}", "view", T0 - k * 60_000] for k in range(j % 5 + 1)] for j in range(7)]
    a = event_arrays(events, [T0] * 7, cat.index_of, um.n_events)
    q = np.zeros((7, cat.dim), np.float32)
    q[0] = cat.matrix[20]
    hq = np.array([1, 0, 0, 0, 0, 0, 0], np.float32)
    got = um.contexts(cat.matrix, a, q, hq)
    np.testing.assert_allclose(got, model.contexts(a, q, hq), atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    int8 = OnnxUserModel(folder / "user", variant="int8")
    assert (int8.contexts(cat.matrix, a, q, hq) * got).sum(1).min() > 0.95


def test_full_blocks_export_as_the_fused_attention_operator(user_model_dir) -> None:
    """The first block's attention is ONNX Runtime's one-kernel operator (int8: QAttention), the
    last block's query-only attention plain ops; the graph still equals torch (previous test)."""
    onnx = pytest.importorskip("onnx")
    folder, _ = user_model_dir

    def ops(name: str) -> list[tuple[str, str]]:
        graph = onnx.load(str(folder / "user" / name)).graph
        return [(n.domain, n.op_type) for n in graph.node if "Attention" in n.op_type]

    assert ops("user_model.onnx") == [("com.microsoft", "Attention")]
    assert ops("user_model.int8.onnx") == [("com.microsoft", "QAttention")]


def test_scorer_takes_p_from_the_user_model_and_falls_back_to_the_blend(user_model_dir) -> None:
    folder, _ = user_model_dir
    s = Settings()
    cat = CatalogIndex.load(folder / "catalog")
    um = load_user_model(folder, cat, variant="fp32")
    with_model = Scorer(cat, s.scoring, s.profile, user_model=um)
    blend = Scorer(cat, s.scoring, s.profile)
    lt = cat.matrix[5]
    seq = Profile("a", long_term=lt, long_term_weight=1.0, last_ts=T0,
                  recent_events=[["i5", "click", T0], ["i7", "view", T0 - 5000]])  # fmt: skip
    old = Profile("b", long_term=lt, long_term_weight=1.0, last_ts=T0)  # written before recent_events
    reqs = [Request("a", seq, k=5, ref_ms=T0), Request("b", old, k=5, ref_ms=T0)]
    P, has, _ = with_model.context_vectors(reqs, T0)
    P0, _, _ = blend.context_vectors(reqs, T0)
    a = event_arrays([seq.recent_events], [T0], cat.index_of, um.n_events)
    expect = um.contexts(cat.matrix, a, np.zeros((1, cat.dim), np.float32), np.zeros(1, np.float32))
    np.testing.assert_allclose(P[0], expect[0], atol=1e-6)
    np.testing.assert_allclose(P[1], P0[1], atol=1e-6)
    assert has.all() and not np.allclose(P[0], P0[0], atol=1e-3)
    lists = with_model.recommend(reqs, now_ms=T0)
    assert all(len(lst) == 5 for lst in lists)


def test_bench_user_model_quick_and_a_folder_without_one(user_model_dir, tmp_path) -> None:
    """``--quick`` (what ``bench all --quick`` passes) times batches 1 and 8 once; a model folder
    without a user model gets a JSON that says why nothing was timed, not a failure."""
    import json

    from click.testing import CliRunner

    from streamrec.cli import main

    folder, _ = user_model_dir
    out = tmp_path / "bench.json"
    args = ["bench", "user-model", "--model-dir", str(folder), "--quick", "--no-torch", "--output", str(out)]
    res = CliRunner().invoke(main, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert set(data["engines"]) == {"onnx_fp32", "onnx_int8"}
    for eng in data["engines"].values():
        assert {k for k in eng if k.startswith("bs")} == {"bs1", "bs8"} and len(eng["bs8"]["repeats"]) == 1
        assert eng["bs1"]["users_per_s"] > 0 and eng["bs8"]["users_per_s"] > 0
    bare = tmp_path / "no-user-model"
    bare.mkdir()
    res = CliRunner().invoke(main, ["bench", "user-model", "--model-dir", str(bare), "--output", str(out)])
    assert res.exit_code == 0, res.output
    assert "has no user model" in json.loads(out.read_text())["skipped"]


def _torch_contexts(model, matrix: np.ndarray, a, q: np.ndarray, hq: np.ndarray) -> np.ndarray:
    """The torch tower over the given catalog vectors (the reference for the served graphs)."""
    import torch

    from inference.training.user_model import _feeds

    with torch.no_grad():
        return model.tower(*_feeds(torch.as_tensor(matrix), a, slice(None), q, hq)).numpy()


def test_the_catalog_projection_is_computed_once_and_again_after_the_catalog_changed(user_model_dir) -> None:
    """The served graph reads the catalog's projection (computed once); an item whose vector
    changes in place (upsert) or a new item must be seen by the next call, not a stale table."""
    folder, model = user_model_dir
    cat = CatalogIndex.load(folder / "catalog")
    um = load_user_model(folder, cat, variant="fp32")
    assert um is not None and um.projection is not None
    events = [[["i3", "click", T0], ["i4", "view", T0 - 60_000]], [["i3", "purchase", T0]]]
    q, hq = np.zeros((2, cat.dim), np.float32), np.zeros(2, np.float32)

    def served() -> np.ndarray:
        a = event_arrays(events, [T0, T0], cat.index_of, um.n_events)
        return um.contexts(cat.matrix, a, q, hq, revision=cat.revision)

    before = served()
    table = um._projected.value
    np.testing.assert_array_equal(served(), before)
    assert um._projected.value is table  # cached: not recomputed per call
    new_vec = np.random.default_rng(5).standard_normal(cat.dim).astype(np.float32)
    cat.upsert(["i3", "fresh"], np.stack([new_vec, -new_vec]))
    events[1].insert(0, ["fresh", "view", T0])
    after = served()
    assert um._projected.value is not table and um._projected.value.shape[0] == len(cat.ids) + 1
    a = event_arrays(events, [T0, T0], cat.index_of, um.n_events)
    assert a.idx[1, 0] == cat.index_of(["fresh"])[0]
    np.testing.assert_allclose(after, _torch_contexts(model, cat.matrix, a, q, hq), atol=1e-5)
    assert not np.allclose(after[0], before[0], atol=1e-3)


def test_a_folder_exported_before_the_projection_split_is_still_served(user_model_dir, tmp_path) -> None:
    """Model folders whose one graph takes the gathered item vectors keep working, with the same p."""
    import json
    import shutil

    import torch

    from inference.manifest import sha256_file
    from inference.user_model import INPUTS, MANIFEST, PROJECTION_FILE, VARIANT_FILES

    folder, model = user_model_dir
    old = tmp_path / "old"
    shutil.copytree(folder, old)
    user = old / "user"
    for f in user.glob("*.onnx"):
        f.unlink()
    n, dim = model.cfg.n_events, model.tower.inp.in_features
    args = (torch.zeros(2, n, dim), torch.zeros(2, n, dtype=torch.long), torch.zeros(2, n), torch.ones(2, n),
            torch.zeros(2, dim), torch.ones(2, 1))  # fmt: skip
    torch.onnx.export(model.tower.eval(), args, str(user / VARIANT_FILES["fp32"]), input_names=list(INPUTS),
                      output_names=["p"], dynamic_axes={k: {0: "b"} for k in INPUTS}, opset_version=17,
                      dynamo=False)  # fmt: skip
    man = json.loads((user / MANIFEST).read_text())
    man["files"] = {f.name: sha256_file(f) for f in sorted(user.iterdir()) if f.name != MANIFEST}
    man["variants"] = ["fp32"]
    (user / MANIFEST).write_text(json.dumps(man))
    assert PROJECTION_FILE not in man["files"]
    cat = CatalogIndex.load(old / "catalog")
    um = load_user_model(old, cat, variant="fp32")
    assert um is not None and um.projection is None
    events = [[[f"i{k}", "view", T0 - k * 60_000] for k in range(j % 4 + 1)] for j in range(5)]
    a = event_arrays(events, [T0] * 5, cat.index_of, um.n_events)
    q, hq = np.zeros((5, cat.dim), np.float32), np.zeros(5, np.float32)
    np.testing.assert_allclose(um.contexts(cat.matrix, a, q, hq), model.contexts(a, q, hq), atol=1e-4)


def test_bench_user_model_times_both_variants_and_the_projection(user_model_dir, tmp_path) -> None:
    import json

    from click.testing import CliRunner

    from benchmarks.user_model import user_model

    folder, _ = user_model_dir
    out = tmp_path / "bench.json"
    args = ["--model-dir", str(folder), "--batches", "1,4", "--repeats", "1", "--output", str(out)]
    r = CliRunner().invoke(user_model, args)
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    assert set(res["engines"]) == {"onnx_fp32", "onnx_int8", "torch"}  # torch: timed in its own process
    for name, eng in res["engines"].items():
        assert eng["bs1"]["users_per_s"] > 0 and eng["bs4"]["users_per_s"] > 0
        assert (eng.get("projection_ms", 0) > 0) == name.startswith("onnx")
    assert res["ratio_onnx_int8_vs_torch_bs4"] > 0 and "ratio_onnx_fp32_vs_torch_bs1" in res
    assert "projection" in r.output


def test_export_keeps_the_torch_weights_it_was_exported_from(user_model_dir) -> None:
    """``user/tower.safetensors`` rebuilds the very tower (the bench's torch engine, re-exports)."""
    torch = pytest.importorskip("torch")
    from inference.training.user_model import load_tower

    folder, model = user_model_dir
    tower = load_tower(folder / "user")
    for (name, a), b in zip(model.tower.state_dict().items(), tower.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def _examples(cat: CatalogIndex, n: int, seed: int):
    """``n`` next-item cases over ``cat``: a context of items whose successor is the target."""
    from inference.training.user_model import Examples

    g = np.random.default_rng(seed)
    first = g.integers(0, len(cat.ids) - 4, n)
    events = [[[f"i{f + k}", "view", T0 - (3 - k) * 60_000] for k in range(3)] for f in first.tolist()]
    arrays = event_arrays(events, [T0] * n, cat.index_of, 6)
    query = np.zeros((n, cat.dim), np.float32)
    return Examples(
        arrays, first + 3, [np.asarray([f, f + 1, f + 2]) for f in first], query, np.zeros(n, np.float32)
    )


def test_weight_averaging_is_what_is_evaluated_kept_and_returned() -> None:
    """With ``ema_epochs`` the model evaluated on valid, kept and returned (exported) is the moving
    average of the weights, not the last step's: an average over a horizon far longer than the
    run stays at the first step's weights, one of a single step is the last weights."""
    pytest.importorskip("torch")
    import torch

    from inference.training.user_model import UserModelConfig, _fit, ndcg_recall

    cat = _catalog()
    train, valid = _examples(cat, 96, 1), _examples(cat, 40, 2)

    def fit(epochs: int, ema: float, max_examples: int = 0, with_valid: bool = False):
        cfg = UserModelConfig(n_events=6, d_model=32, layers=1, heads=2, batch_size=16, lr=3e-3, dropout=0.0,
                              epochs=epochs, ema_epochs=ema, max_examples=max_examples, patience=9)  # fmt: skip
        torch.manual_seed(0)
        return _fit(cat, train, cfg, epochs, valid if with_valid else None, False, np.random.default_rng(0))

    def weights(m) -> torch.Tensor:
        return torch.cat([p.detach().flatten() for p in [*m.tower.parameters(), m.table.offset]])

    plain, _, _ = fit(3, 0.0)
    one_step, _, _ = fit(1, 0.0, max_examples=16)
    frozen, _, _ = fit(3, 1e9)  # the average never moves from the first step's weights
    last, _, _ = fit(3, 1e-9)  # an average over one step is the last weights
    assert not torch.allclose(weights(plain), weights(one_step))
    torch.testing.assert_close(weights(frozen), weights(one_step))
    torch.testing.assert_close(weights(last), weights(plain))
    # selection reads the averaged weights: the returned model scores the kept epoch's valid figure
    model, best, history = fit(4, 1.0, with_valid=True)
    assert len(history) == 4 and best["ndcg@10"] == max(h["ndcg@10"] for h in history)
    assert ndcg_recall(model, valid)["ndcg@10"] == pytest.approx(best["ndcg@10"], abs=1e-6)
    assert not torch.allclose(weights(model), weights(fit(int(best["epoch"]), 0.0)[0]))
