"""bentofile.yaml builds a Bento for one model tag offline; `bentoml serve <bento>` serves it."""

from __future__ import annotations

import httpx
import pytest

from tests.fixtures.world import World, start_bentoml

pytestmark = pytest.mark.integration


def test_build_and_serve_the_bento(world: World, tmp_path) -> None:
    from driftloop.bento import build_model_bento, model_tag_of_bento

    bento_tag = build_model_bento(world.model_tag)
    assert bento_tag == f"driftloop-fraud:{world.model_tag.split(':')[1]}"
    assert model_tag_of_bento(bento_tag) == world.model_tag
    env = {**world.env, "DRIFTLOOP_SHIPPER_INTERVAL_SECONDS": "0.5"}
    env.pop("DRIFTLOOP_MODEL_TAG", None)  # the Bento pins its own model
    server = start_bentoml(bento_tag, env, tmp_path / "bento.log")
    try:
        row = world.transactions.row(-1, named=True)
        body = {
            "transaction": {
                "transaction_id": "bento-1",
                "card_id": row["card_id"],
                "merchant_id": row["merchant_id"],
                "amount": row["amount"],
                "category": row["category"],
            }
        }
        r = httpx.post(f"{server.url}/predict", json=body, timeout=30)
        assert r.status_code == 200, r.text
        assert f"{r.json()['model']}:{r.json()['model_version']}" == world.model_tag
    finally:
        server.stop()


def test_latest_is_refused(world: World) -> None:
    from driftloop.bento import build_model_bento
    from driftloop.errors import ModelError

    with pytest.raises(ModelError, match="explicit version"):
        build_model_bento("fraud:latest")
    with pytest.raises(ModelError, match="not in the BentoML store"):
        build_model_bento("fraud:v0000")
