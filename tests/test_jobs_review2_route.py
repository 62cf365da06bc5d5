"""Resume over HTTP counts a failed job against the key's job limit and the disk quota (429 / 507), as a
submission does; an interrupted job keeps its place."""

from __future__ import annotations

from service.api.deps import key_owner
from tests.helpers.service import API_KEY, AUTH, make_client


def test_resume_over_http_answers_429_and_507_like_a_submission(home):
    owner = key_owner(API_KEY)
    with make_client(home, max_active_jobs_per_key=1, max_active_dataset_bytes=1000) as client:
        store = client.app.state.store
        failed = store.create({"request": {}, "owner": owner, "dataset_bytes": 800})
        store.claim_next(worker_pid=1)
        store.finish(failed.id, "failed", error="boom")
        other = store.create({"request": {}, "owner": owner})
        resp = client.post(f"/v1/jobs/{failed.id}/resume", headers=AUTH)
        assert resp.status_code == 429 and "limit 1" in resp.json()["message"]
        store.request_cancel(other.id)
        store.create({"request": {}, "owner": "someone-else", "dataset_bytes": 500})
        resp = client.post(f"/v1/jobs/{failed.id}/resume", headers=AUTH)
        assert resp.status_code == 507 and "quota" in resp.json()["message"]
        assert store.get(failed.id).state == "failed"
        assert client.post(f"/v1/jobs/{other.id}/resume", headers=AUTH).status_code == 409  # cancelled
