"""The synthetic world is deterministic, and the structure each technique needs is really there,
each property measured against a shuffled or structure-free control."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import torch

from ebr.data.synth import generate
from ebr.data.tables import connect
from ebr.workspace import Workspace


def _table_hash(ws: Workspace, table: str) -> str:
    return (
        connect(ws)
        .execute(
            f"SELECT count(*)::VARCHAR || '-' || sum(hash(COLUMNS(*)))::VARCHAR FROM (SELECT * EXCLUDE (embedding) FROM {table})"  # noqa: E501
            if table == "pins"
            else f"SELECT count(*)::VARCHAR || '-' || sum(hash(t))::VARCHAR FROM {table} t"
        )
        .fetchone()[0]
    )


def test_same_seed_same_tables(tiny_ws, tmp_path):
    again = Workspace.at(tmp_path / "again")
    generate(again, "tiny", seed=0, progress=False)
    other = Workspace.at(tmp_path / "other")
    generate(other, "tiny", seed=1, progress=False)
    for t in ("engagements", "pins", "users", "interests"):
        assert _table_hash(again, t) == _table_hash(tiny_ws, t), t
    assert _table_hash(other, "engagements") != _table_hash(tiny_ws, "engagements")
    emb = connect(again).execute("SELECT embedding FROM pins ORDER BY pin_id LIMIT 3").fetchall()
    assert emb == connect(tiny_ws).execute("SELECT embedding FROM pins ORDER BY pin_id LIMIT 3").fetchall()


def test_tables_have_every_property(tiny_ws):
    con = connect(tiny_ws)
    actions = dict(con.execute("SELECT action, count(*) FROM engagements GROUP BY 1").fetchall())
    assert set(actions) == {"impression", "closeup", "click", "save", "hide"}
    assert actions["impression"] > actions["closeup"] > actions["click"] > actions["save"] > 0
    assert {r[0] for r in con.execute("SELECT DISTINCT surface FROM engagements").fetchall()} == {
        "homefeed",
        "search",
        "related",
    }
    # the sourcing interest is logged for search and part of homefeed, never for related pins
    share = dict(
        con.execute("SELECT surface, avg((condition_interest IS NOT NULL)::INT) FROM engagements GROUP BY 1").fetchall()
    )
    assert share["search"] == 1.0 and 0.15 < share["homefeed"] < 0.5 and share["related"] == 0.0
    n_int = con.execute("SELECT min(len(interests)), max(len(interests)) FROM pins").fetchone()
    assert n_int == (1, 3)
    truth = pq.read_table(tiny_ws.truth_dir / "users.parquet")
    lens = [len(x) for x in truth["interests"].to_pylist()]
    assert min(lens) == 1 and max(lens) <= 7 and len(set(lens)) >= 4


def test_engagements_concentrate_in_latent_interests(small_ws):
    """Share of a user's positive engagements on pins of their latent interests vs shuffled users."""
    con = connect(small_ws)
    con.execute(f"CREATE VIEW truth AS SELECT * FROM read_parquet('{small_ws.truth_dir}/users.parquet')")
    con.execute(f"CREATE VIEW pt AS SELECT * FROM read_parquet('{small_ws.truth_dir}/pins.parquet')")
    q = """
      WITH pos AS (SELECT {u} AS user_id, pin_id FROM engagements WHERE action IN ('closeup','click','save'))
      SELECT avg(list_contains(t.interests, pt.primary_interest)::INT)
      FROM pos JOIN pt USING (pin_id) JOIN truth t USING (user_id)"""
    real = con.execute(q.format(u="user_id")).fetchone()[0]
    # control: each engagement given a random user (setseed keeps it repeatable)
    con.execute("SELECT setseed(0.42)")
    shuffled = con.execute(q.format(u="'u' || (random() * 11999)::INT::VARCHAR")).fetchone()[0]
    assert real > 0.9 and shuffled < 0.35 and real > 3 * shuffled, (real, shuffled)


def test_duplicate_groups(tiny_ws):
    con = connect(tiny_ws)
    groups, in_groups, fine_distinct = con.execute(
        """SELECT count(*), sum(n), sum(nf) FROM (SELECT image_sig_coarse, count(*) n, count(DISTINCT image_sig) nf
           FROM pins GROUP BY 1 HAVING count(*) > 1)"""
    ).fetchone()
    assert groups > 100 and fine_distinct == in_groups  # one coarse signature, distinct fine ones
    # members of a group look alike: content-embedding cosine far above random pin pairs
    rows = con.execute("SELECT image_sig_coarse, embedding FROM pins ORDER BY pin_id").fetchall()
    sig = np.array([r[0] for r in rows])
    emb = np.array([r[1] for r in rows], dtype=np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    order = np.argsort(sig, kind="stable")
    same = sig[order][1:] == sig[order][:-1]
    dup_cos = (emb[order][1:][same] * emb[order][:-1][same]).sum(1).mean()
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, len(emb), (2, 2000))
    rand_cos = (emb[a] * emb[b]).sum(1).mean()
    assert dup_cos > 0.8 and dup_cos > rand_cos + 0.5, (dup_cos, rand_cos)


def test_decayed_ranking_predicts_next_week_better(small_ws):
    """Top-N pins by a 14-day-half-life decayed score vs by the 90-day raw sum: share of the next
    week's positive engagements that fall on the top N."""
    con = connect(small_ws)
    asof = con.execute("SELECT max(ts) - INTERVAL 14 DAY FROM engagements").fetchone()[0]
    scores = """
      SELECT pin_id, sum(w * pow(2, -epoch(? - ts) / 86400 / 14)) AS decayed, sum(w) AS raw FROM (
        SELECT pin_id, ts, CASE action WHEN 'save' THEN 3 WHEN 'click' THEN 2 WHEN 'closeup' THEN 1 ELSE 0 END AS w
        FROM engagements WHERE ts < ? AND ts >= ? - INTERVAL 90 DAY) GROUP BY 1"""
    con.execute(f"CREATE TABLE s AS {scores}", [asof, asof, asof])
    con.execute(
        """CREATE TABLE nxt AS SELECT pin_id FROM engagements WHERE ts >= ? AND ts < ? + INTERVAL 7 DAY
                   AND action IN ('closeup','click','save')""",
        [asof, asof],
    )
    n = 2000
    share = {}
    for col in ("decayed", "raw"):
        share[col] = con.execute(
            f"""SELECT avg((pin_id IN (SELECT pin_id FROM s ORDER BY {col} DESC, pin_id LIMIT {n}))::INT) FROM nxt"""
        ).fetchone()[0]
    assert share["decayed"] > share["raw"] * 1.5, share


def _auc(score: np.ndarray, y: np.ndarray) -> float:
    order = np.argsort(score, kind="stable")
    ranks = np.empty(len(score))
    ranks[order] = np.arange(1, len(score) + 1)
    npos = y.sum()
    return float((ranks[y == 1].sum() - npos * (npos + 1) / 2) / (npos * (len(y) - npos)))


def test_cross_terms_carry_signal(small_ws):
    """Logistic model of a click-or-save given an impression: user x pin product terms beat the
    same model with only the main effects by a clear AUC margin (what MaskNet/DHEN must find)."""
    con = connect(small_ws)
    rows = con.execute(
        """SELECT u.cat_locale, u.cat_age_bucket, p.cat_language, p.cat_format,
                  (e.action IN ('click', 'save'))::INT AS y
           FROM engagements e JOIN users u USING (user_id) JOIN pins p USING (pin_id)
           USING SAMPLE 200000 ROWS (reservoir, 7)"""
    ).fetchall()
    cols = list(zip(*rows))
    y = np.array(cols[4], dtype=np.float32)

    def onehot(values):
        keys = sorted(set(values))
        idx = np.array([keys.index(v) for v in values])
        return np.eye(len(keys), dtype=np.float32)[idx]

    loc, age, lang, fmt = (onehot(c) for c in cols[:4])
    main_effects = np.concatenate([loc, age, lang, fmt], axis=1)
    cross = np.concatenate(
        [
            (loc[:, :, None] * lang[:, None, :]).reshape(len(y), -1),
            (age[:, :, None] * fmt[:, None, :]).reshape(len(y), -1),
        ],
        axis=1,
    )
    half = len(y) // 2
    aucs = {}
    for name, x in {"main": main_effects, "cross": np.concatenate([main_effects, cross], axis=1)}.items():
        xt = torch.from_numpy(x)  # fit on one half, measure AUC on the other
        score = _fit_logistic_predict(xt[:half], torch.from_numpy(y[:half]), xt[half:])
        aucs[name] = _auc(score.numpy(), y[half:])
    assert aucs["cross"] > aucs["main"] + 0.05, aucs


def _fit_logistic_predict(x: torch.Tensor, y: torch.Tensor, x_test: torch.Tensor) -> torch.Tensor:
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=80, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y) + 1e-4 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return (x_test @ w + b).detach()
