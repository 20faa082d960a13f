"""The service's writes: POST / DELETE /v1/documents against a served index, /v1/search with a
metadata filter, hostile filters, and searches answered while a write runs."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from _serve_tools import DOCS, Server, build_model

import edgeplaid.serve.app as app_module
from edgeplaid.index import Index
from edgeplaid.serve import ServeConfig, create_app

TEXTS = [f"{d} Sample {i}." for i in range(8) for d in DOCS]  # 40 documents
# The 40 documents' codec fits them closely (256 centroids for ~700 tokens): any addition "drifts".
pytestmark = pytest.mark.filterwarnings("ignore:.*drift from the index's codec")


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory):
    return build_model(tmp_path_factory)


@pytest.fixture(scope="module")
def encoded(model):
    return model.encode_documents(TEXTS)


def _build(encoded, path: Path) -> Index:
    """40 documents doc-0..doc-39 with metadata {"n": i, "kind": "even"/"odd"} (doc-39: none)."""
    tokens, doclens = encoded
    ids = [f"doc-{i}" for i in range(len(TEXTS))]
    meta = [{"n": i, "kind": "odd" if i % 2 else "even"} for i in range(len(TEXTS) - 1)] + [None]
    idx = Index.build(path, tokens, doclens, ids=ids, metadata=meta, progress=False)
    (path / "encoder.json").write_text(json.dumps({"model": "m", "dim": idx.dim}))
    return idx


@pytest.fixture()
def index(encoded, tmp_path: Path) -> Index:
    return _build(encoded, tmp_path / "idx")


@pytest.fixture(scope="module")
def refusing(model, encoded, tmp_path_factory: pytest.TempPathFactory):
    """(url, index) of one server for the requests it must refuse (the index never changes)."""
    index = _build(encoded, tmp_path_factory.mktemp("refusing") / "idx")
    app = create_app(model, index, ServeConfig(max_documents=10, max_text_chars=100))
    with Server(app) as url:
        yield url, index


def _vectors(model, text: str) -> list[list[float]]:
    tokens, _ = model.encode_documents([text])
    return tokens.tolist()


def _delete(client: httpx.Client, body: dict) -> httpx.Response:
    return client.request("DELETE", "/v1/documents", json=body)


def test_add_by_text_and_by_embedding(model, index):
    app = create_app(model, index)
    n = index.n_docs
    body = {
        "documents": [
            {"id": "t-1", "text": "Supersonic wings and shock waves.", "metadata": {"kind": "new", "n": 100}},
            {"id": "e-1", "embedding": _vectors(model, "Heat flows through slabs.")},
        ]
    }
    with Server(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        r = client.post("/v1/documents", json=body)
        assert r.status_code == 200, r.text
        assert r.json() == {"added": 2, "updated": 0, "n_docs": n + 2}
        # The served Index object is the one written: it searches the new version.
        hit = client.post(
            "/v1/search", json={"queries": ["supersonic shock"], "k": 3, "where": "kind = 'new'"}
        ).json()
        assert hit["user_ids"] == [["t-1", None, None]]
        # The text was encoded as offline: the document's own encoding finds it first, exactly.
        q, m = model.encode_queries(["Supersonic wings and shock waves."])
        res = client.post("/v1/search", json={"queries": ["Supersonic wings and shock waves."], "k": 1})
        assert res.json()["user_ids"] == index.search(q, k=1, queries_mask=m).user_ids
        # Metadata as one list beside the documents.
        r = client.post(
            "/v1/documents",
            json={
                "documents": [
                    {"id": "e-2", "embedding": _vectors(model, "wing")},
                    {"id": "t-2", "text": "lift"},
                ],
                "metadata": [None, {"kind": "listed"}],
            },
        )
        assert r.status_code == 200 and r.json()["n_docs"] == n + 4, r.text
    assert {"t-1", "e-1", "e-2", "t-2"} <= set(index.ids())
    assert index.metadata(["t-1", "e-1", "e-2", "t-2"]) == [
        {"kind": "new", "n": 100},
        None,
        None,
        {"kind": "listed"},
    ]
    # Each write switched in a new index directory: the record of the model is kept in it.
    assert json.loads((index.path / "encoder.json").read_text())["model"] == "m"


def test_existing_ids_are_409_unless_upsert(model, index):
    app = create_app(model, index)
    n = index.n_docs
    with Server(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        body = {
            "documents": [
                {"id": "doc-new", "text": "wing lift", "metadata": {"kind": "fresh"}},
                {"id": "doc-3", "text": "a new doc-3", "metadata": {"kind": "fresh"}},
            ]
        }
        r = client.post("/v1/documents", json=body)
        assert (
            r.status_code == 409 and "documents[1].id: 'doc-3' is in the index already" in r.json()["error"]
        )
        assert index.n_docs == n and "doc-new" not in index  # nothing written
        r = client.post("/v1/documents", json={**body, "upsert": True})
        assert r.status_code == 200 and r.json() == {"added": 1, "updated": 1, "n_docs": n + 1}, r.text
        assert index.metadata(["doc-3", "doc-new"]) == [{"kind": "fresh"}] * 2
        # Upsert of ids that all exist: one update, nothing added.
        r = client.post("/v1/documents", json={**body, "upsert": True})
        assert r.json() == {"added": 0, "updated": 2, "n_docs": n + 1}


def test_delete_by_ids_and_by_filter(model, index):
    app = create_app(model, index)
    n = index.n_docs
    with Server(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        r = _delete(client, {"ids": ["doc-0", "doc-1", "doc-0"]})
        assert r.status_code == 200 and r.json() == {"deleted": 2, "n_docs": n - 2}, r.text
        r = _delete(client, {"ids": ["doc-2", "nope"]})
        assert r.status_code == 404 and r.json()["error"] == "ids: 'nope' is not a document of this index"
        r = _delete(client, {"ids": ["doc-0"]})  # deleted already: unknown now
        assert r.status_code == 404 and "'doc-0'" in r.json()["error"]
        assert "doc-2" in index and index.n_docs == n - 2  # all or nothing
        want = index.select("kind = ? AND n < ?", ["even", 10])
        assert sorted(want) == ["doc-2", "doc-4", "doc-6", "doc-8"]
        r = _delete(client, {"where": "kind = ? AND n < ?", "params": ["even", 10]})
        assert r.json() == {"deleted": 4, "n_docs": n - 6}
        r = _delete(client, {"where": "kind = 'none of them'"})
        assert r.json() == {"deleted": 0, "n_docs": n - 6}
    assert not {"doc-0", "doc-1", "doc-2", "doc-4", "doc-6", "doc-8"} & set(index.ids())


def test_search_with_a_filter_equals_offline(model, index):
    app = create_app(model, index, ServeConfig(batch_window_ms=50))
    queries = ["heat in slabs", "wing lift"]
    bodies = [
        {"queries": queries, "k": 5, "where": "kind = ? AND n >= ?", "params": ["odd", 11]},
        {"queries": queries, "k": 5, "where": "n IN (1, 2, 3)"},
        {"queries": queries, "k": 5},
        # Two filters equal in Python (1 == 1.0) batched apart, each answered as offline.
        {"queries": queries, "k": 5, "where": "n = ?", "params": [1]},
        {"queries": queries, "k": 5, "where": "n = ?", "params": [1.0]},
    ]
    with Server(app) as url:

        def post(body: dict) -> dict:
            r = httpx.post(f"{url}/v1/search", json=body, timeout=60)
            assert r.status_code == 200, r.text
            return r.json()

        # Concurrent: requests of different filters share a batch and each keeps its own filter.
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(len(bodies)) as pool:
            answers = list(pool.map(post, bodies))
    q, m = model.encode_queries(queries)
    for body, got in zip(bodies, answers, strict=True):
        want = index.search(q, k=5, queries_mask=m, where=body.get("where"), params=body.get("params"))
        assert got["user_ids"] == want.user_ids
        assert torch.tensor([[x if x is not None else -torch.inf for x in r] for r in got["scores"]]) == (
            pytest.approx(want.scores, abs=1e-5)
        )
    assert all(
        u is None or (int(u[4:]) % 2 and int(u[4:]) >= 11) for row in answers[0]["user_ids"] for u in row
    )
    assert {u for row in answers[1]["user_ids"] for u in row} == {"doc-1", "doc-2", "doc-3", None}


HOSTILE_WHERE = [
    ({"where": "n = 1; DROP TABLE docs"}, "where: ';' is not allowed"),
    ({"where": "n = (SELECT 1)"}, "where: "),
    ({"where": "load_extension('x') = 1"}, "where: function calls are not allowed"),
    ({"where": "n = 1 -- x"}, "where: SQL comments"),
    ({"where": "n = 1 UNION SELECT pos FROM docs"}, "where: "),
    ({"where": '"n" = 1'}, "where: double-quoted identifiers"),
    ({"where": "n = 'open"}, "where: unterminated string literal"),
    ({"where": "n = ?"}, "where: the filter has 1 '?' but 0 params were given"),
    ({"where": "n = ?", "params": [[1]]}, "where: params[0] has type list"),
    ({"where": "n = ?", "params": [{"a": 1}]}, "where: params[0] has type dict"),
    ({"where": "n = ?", "params": [2**70]}, "where: params[0]"),
    ({"where": "(" * 40 + "n = 1" + ")" * 40}, "where: nested deeper than"),
    ({"where": "n = 1 OR " * 600 + "n = 1"}, "where: the filter has"),
    ({"where": ""}, "where: the filter is empty"),
    ({"where": "n = '\udfff'"}, "where"),
    ({"where": 5}, "where"),
    ({"params": [1]}, "params: given without a where filter"),
]


@pytest.mark.parametrize(("extra", "message"), HOSTILE_WHERE)
def test_hostile_filters_are_422_never_500(refusing, extra, message):
    url, index = refusing
    n = index.n_docs
    with httpx.Client(base_url=url, timeout=60) as client:
        body = json.dumps({"queries": ["wing"], "k": 3, **extra}).encode()  # lone surrogates as \\udfff
        r = client.post("/v1/search", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 422 and message in r.json()["error"], r.text
        if "where" in extra:
            body = json.dumps(extra).encode()
            r = client.request(
                "DELETE", "/v1/documents", content=body, headers={"content-type": "application/json"}
            )
            assert r.status_code == 422 and message in r.json()["error"], r.text
    assert index.n_docs == n


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"documents": []}, 422, "documents"),
        ({"documents": [{"id": "x"}]}, 422, "documents[0]: give either text or embedding"),
        ({"documents": [{"id": "x", "text": "a", "embedding": [[0.5] * 32]}]}, 422, "give either"),
        ({"documents": [{"id": "x", "text": "  "}]}, 422, "documents[0].text: empty text"),
        ({"documents": [{"id": "x", "text": "y" * 101}]}, 422, "more than the limit of 100"),
        ({"documents": [{"id": "x", "text": "y"}] * 11}, 422, "11 documents, more than the limit of 10"),
        ({"documents": [{"id": "x", "text": "y"}, {"id": "x", "text": "z"}]}, 422, "documents[1].id: the id"),
        (
            {"documents": [{"id": 7, "text": "y"}]},
            422,
            "documents[0].id: this index's ids are strings, got 7",
        ),
        ({"documents": [{"id": True, "text": "y"}]}, 422, "documents.0.id"),
        ({"documents": [{"id": 1.5, "text": "y"}]}, 422, "documents.0.id"),
        ({"documents": [{"id": "x", "embedding": [[0.5] * 31]}]}, 422, "dim 31, the index's are of dim 32"),
        ({"documents": [{"id": "x", "embedding": [[0.5] * 32, [1]]}]}, 422, "documents[0].embedding"),
        ({"documents": [{"id": "x", "embedding": [[1e39] * 32]}]}, 422, "non-finite value"),
        ({"documents": [{"id": "x", "embedding": []}]}, 422, "documents.0.embedding"),
        ({"documents": [{"id": "x", "text": "y", "metadata": {"a": 2**70}}]}, 422, "metadata: document 0"),
        ({"documents": [{"id": "x", "text": "y", "metadata": [1]}]}, 422, "documents.0.metadata"),
        (
            {"documents": [{"id": "x", "text": "y", "metadata": {"a": 1}}], "metadata": [{"b": 2}]},
            422,
            "metadata: give it per document or as one list, not both",
        ),
        ({"documents": [{"id": "x", "text": "y"}], "metadata": [None, None]}, 422, "2 items for 1 documents"),
        ({"documents": [{"id": "x", "text": "y \udfff"}]}, 422, "documents"),
        ({"documents": [{"id": "x \udfff", "text": "y"}]}, 422, "documents"),
    ],
)
def test_bad_documents_are_refused_naming_the_field(refusing, body, status, message):
    url, index = refusing
    n = index.n_docs
    with httpx.Client(base_url=url, timeout=60) as client:
        r = client.post(
            "/v1/documents", content=json.dumps(body).encode(), headers={"content-type": "application/json"}
        )
        assert r.status_code == status and message in r.json()["error"], r.text
    assert index.n_docs == n


def test_nan_metadata_and_bad_delete_bodies(model, index):
    app = create_app(model, index, ServeConfig(max_documents=3))
    with Server(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        # Python's JSON (the client's and the server's) writes and reads NaN: the index refuses it.
        body = json.dumps({"documents": [{"id": "x", "text": "y", "metadata": {"w": float("nan")}}]})
        r = client.post("/v1/documents", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 422 and "NaN" in r.json()["error"], r.text
        for bad, message in [
            ({}, "ids: give either ids or a where filter"),
            ({"ids": ["doc-1"], "where": "n = 1"}, "ids: give either ids or a where filter"),
            ({"ids": ["doc-1"], "params": [1]}, "params: given without a where filter"),
            ({"ids": []}, "ids"),
            ({"ids": ["a", "b", "c", "d"]}, "ids: 4 ids, more than the limit of 3"),
            ({"ids": [5]}, "ids[0]: this index's ids are strings, got 5"),
            ({"ids": [None]}, "ids.0"),
        ]:
            r = _delete(client, bad)
            assert r.status_code == 422 and message in r.json()["error"], (bad, r.text)


def test_int_ids_and_a_service_without_a_model(model, encoded, tmp_path):
    tokens, doclens = encoded
    index = Index.build(tmp_path / "idx", tokens, doclens, ids=list(range(100, 140)), progress=False)
    app = create_app(None, index)
    with Server(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        r = client.post(
            "/v1/documents", json={"documents": [{"id": 7, "embedding": _vectors(model, "wing")}]}
        )
        assert r.status_code == 200 and r.json()["n_docs"] == 41, r.text
        r = client.post("/v1/documents", json={"documents": [{"id": 8, "text": "wing"}]})
        assert r.status_code == 422 and "no model to encode texts" in r.json()["error"]
        r = client.post("/v1/documents", json={"documents": [{"id": 2**63, "embedding": [[0.1] * 32]}]})
        assert r.status_code == 422 and "64-bit" in r.json()["error"]
        r = client.post("/v1/documents", json={"documents": [{"id": "s", "embedding": [[0.1] * 32]}]})
        assert r.status_code == 422 and "ids are integers" in r.json()["error"]
        assert _delete(client, {"ids": [7, 100]}).json() == {"deleted": 2, "n_docs": 39}
        r = _delete(client, {"ids": [7]})
        assert r.status_code == 404 and r.json()["error"] == "ids: 7 is not a document of this index"


def test_no_index_is_404_and_the_key_is_required(model):
    app = create_app(model, config=ServeConfig(api_key="k"))
    with Server(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        body = {"documents": [{"id": "a", "text": "wing"}]}
        assert client.post("/v1/documents", json=body).status_code == 401
        assert _delete(client, {"ids": ["a"]}).status_code == 401
        key = {"X-API-Key": "k"}
        r = client.post("/v1/documents", json=body, headers=key)
        assert r.status_code == 404 and "no index loaded" in r.json()["error"]
        r = client.request("DELETE", "/v1/documents", json={"ids": ["a"]}, headers=key)
        assert r.status_code == 404 and "no index loaded" in r.json()["error"]


def _blocking_writes(monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, threading.Event]:
    """Makes every write wait (in the writer thread) until ``release`` is set; ``entered`` is set
    when one does."""
    entered, release = threading.Event(), threading.Event()
    original = app_module.write_documents

    def slow(index, docs):
        entered.set()
        assert release.wait(60)
        return original(index, docs)

    monkeypatch.setattr(app_module, "write_documents", slow)
    return entered, release


def test_searches_are_answered_while_a_write_runs(model, index, monkeypatch):
    entered, release = _blocking_writes(monkeypatch)
    app = create_app(model, index, ServeConfig(max_write_queue=1))
    n = index.n_docs
    with Server(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        answer: dict = {}

        def write() -> None:
            body = {"documents": [{"id": "late", "text": "supersonic shock", "metadata": {"kind": "late"}}]}
            answer["r"] = httpx.post(f"{url}/v1/documents", json=body, timeout=60)

        writer = threading.Thread(target=write)
        writer.start()
        assert entered.wait(30)
        # The write is under way (blocked in the writer thread): searches are answered meanwhile,
        # on the version before it.
        for _ in range(3):
            r = client.post(
                "/v1/search", json={"queries": ["supersonic shock"], "k": 3, "where": "kind = 'late'"}
            )
            assert r.status_code == 200 and r.json()["user_ids"] == [[None, None, None]]
        # A second write beyond max_write_queue is refused at once.
        r = client.post("/v1/documents", json={"documents": [{"id": "x", "text": "wing"}]})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert client.get("/healthz").status_code == 200
        release.set()
        writer.join(60)
        assert answer["r"].status_code == 200 and answer["r"].json()["n_docs"] == n + 1
        r = client.post(
            "/v1/search", json={"queries": ["supersonic shock"], "k": 3, "where": "kind = 'late'"}
        )
        assert r.json()["user_ids"] == [["late", None, None]]


def test_concurrent_writes_and_searches(model, index):
    """Writes (adds, upserts, deletes) from threads while searches run: every request answered
    right, every search a consistent version (its ids live in it, never a deleted slot)."""
    app = create_app(model, index, ServeConfig(batch_window_ms=1))
    vec = _vectors(model, "Shock waves form at supersonic speeds.")
    stop = threading.Event()
    errors: list[str] = []
    n_searches = 0
    with Server(app) as url:

        def writes() -> None:
            with httpx.Client(base_url=url, timeout=60) as c:
                for i in range(12):
                    docs = [
                        {"id": f"w{i}-{j}", "embedding": vec, "metadata": {"kind": "w"}} for j in range(4)
                    ]
                    r = c.post("/v1/documents", json={"documents": docs})
                    if r.status_code != 200:
                        errors.append(r.text)
                    r = c.post("/v1/documents", json={"documents": docs[:1], "upsert": True})
                    if r.json().get("updated") != 1:
                        errors.append(r.text)
                    if i % 2:
                        r = c.request("DELETE", "/v1/documents", json={"ids": [f"w{i - 1}-0", f"w{i}-1"]})
                        if r.json().get("deleted") != 2:
                            errors.append(r.text)
            stop.set()

        def searches() -> None:
            nonlocal n_searches
            with httpx.Client(base_url=url, timeout=60) as c:
                while not stop.is_set():
                    r = c.post("/v1/search", json={"queries": ["supersonic shock"], "k": 10})
                    ids = r.json().get("user_ids", [[None]])[0] if r.status_code == 200 else None
                    if ids is None or None in ids or len(set(ids)) != len(ids):
                        errors.append(r.text)
                    n_searches += 1

        threads = [threading.Thread(target=writes), *(threading.Thread(target=searches) for _ in range(2))]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert time.monotonic() - t0 < 120
    assert not errors, errors[:3]
    assert n_searches > 0
    assert index.n_docs == 40 + 12 * 4 - 12
    assert len(index.select("kind = 'w'")) == 12 * 4 - 12


def test_the_command_line_sets_the_write_queue(monkeypatch):
    import uvicorn

    from edgeplaid.cli import build_parser
    from edgeplaid.serve import serve

    started = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self: started.append(self.config))
    monkeypatch.setattr(os, "environ", dict(os.environ))
    serve(build_parser().parse_args(["serve", "--max-write-queue", "3"]))
    assert started[0].app.state.config.max_write_queue == 3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_writes_to_an_index_served_on_cuda(model, index):
    """The written index is reloaded onto its device: the GPU service finds what was added, with
    the filter, and no longer what was deleted."""
    import copy

    on_gpu = copy.deepcopy(model).to("cuda")
    gpu_index = Index.load(index.path, device="cuda")
    app = create_app(on_gpu, gpu_index)
    body = {
        "documents": [{"id": "g-1", "text": "Supersonic wings and shock waves.", "metadata": {"kind": "g"}}]
    }
    with Server(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        r = client.post("/v1/documents", json=body)
        assert r.status_code == 200 and r.json()["n_docs"] == 41, r.text
        assert _delete(client, {"ids": ["doc-0"]}).json() == {"deleted": 1, "n_docs": 40}
        hit = client.post(
            "/v1/search", json={"queries": ["supersonic shock"], "k": 3, "where": "kind = 'g' OR n = 0"}
        ).json()
    assert hit["user_ids"] == [["g-1", None, None]]
    assert gpu_index.device.type == "cuda" and "g-1" in gpu_index and "doc-0" not in gpu_index


def test_lexical_and_hybrid_search_and_writes(model, encoded, tmp_path):
    """mode / alpha / fusion on /v1/search answer as Index.search does; on an index with a
    lexical side every written document needs its text (with or without embedding)."""
    tokens, doclens = encoded
    ids = [f"doc-{i}" for i in range(len(TEXTS))]
    index = Index.build(tmp_path / "lex", tokens, doclens, ids=ids, texts=TEXTS, progress=False)
    plain = _build(encoded, tmp_path / "plain")
    queries = ["heat in slabs", "wing lift"]
    q, m = model.encode_queries(queries)
    with Server(create_app(model, index)) as url, httpx.Client(base_url=url, timeout=60) as client:
        for body, want in (
            ({"mode": "lexical"}, index.search(text=queries, k=5)),
            ({"mode": "hybrid"}, index.search(q, k=5, queries_mask=m, text=queries)),
            (
                {"mode": "hybrid", "alpha": 0.3, "fusion": "rrf", "where": None},
                index.search(q, k=5, queries_mask=m, text=queries, alpha=0.3, fusion="rrf"),
            ),
        ):
            r = client.post("/v1/search", json={"queries": queries, "k": 5, **body})
            assert r.status_code == 200, r.text
            assert r.json()["user_ids"] == want.user_ids
        for bad, message in (
            ({"mode": "late", "alpha": 0.5}, "only with mode 'hybrid'"),
            ({"mode": "hybrid", "alpha": 2}, "alpha"),
            ({"mode": "fuzzy"}, "mode"),
        ):
            r = client.post("/v1/search", json={"queries": queries, **bad})
            assert r.status_code == 422 and message in r.text, r.text
        # writes: text alone (encoded), embedding + text, embedding alone refused
        r = client.post(
            "/v1/documents",
            json={
                "documents": [
                    {"id": "t-1", "text": "zeppelin airships"},
                    {"id": "e-1", "embedding": _vectors(model, "gliders"), "text": "glider soaring"},
                ]
            },
        )
        assert r.status_code == 200, r.text
        hit = client.post("/v1/search", json={"queries": ["zeppelin soaring"], "k": 2, "mode": "lexical"})
        assert set(hit.json()["user_ids"][0]) == {"t-1", "e-1"}
        r = client.post(
            "/v1/documents", json={"documents": [{"id": "e-2", "embedding": _vectors(model, "x")}]}
        )
        assert r.status_code == 422 and "documents[0].text" in r.text
    with Server(create_app(model, plain)) as url:
        r = httpx.post(f"{url}/v1/search", json={"queries": queries, "mode": "hybrid"}, timeout=60)
        assert r.status_code == 422 and "lexical side" in r.text
