"""BASELINE ONLY — the HTTP + pickle reward-server pattern of Flow-GRPO, for comparison.

Flow-GRPO's (and DDPO's) remote rewards are Flask apps under gunicorn with sync workers:
the client pickles a dict of JPEG bytes and prompts, POSTs it, and unpickles the reply;
large batches are posted in chunks, one after another. This module reproduces that
pattern around the *same* reward model our gRPC service hosts, so ``bench_serving.py``
can compare the two. Pickle is used only here, on loopback, between processes of this
benchmark; never serve it to a network (unpickling untrusted bytes runs code).

    BASELINE_CHECKPOINT=... gunicorn -w 1 -b 127.0.0.1:PORT \
        --chdir benchmarks "http_pickle_baseline:create_app()"

``BASELINE_REWARD=brightness`` hosts the weight-free ``brightness`` reward instead of the
CLIP model (the transport-dominated comparison; no checkpoint needed).
"""

from __future__ import annotations

import concurrent.futures
import io
import os
import pickle

import numpy as np


def create_app():  # noqa: ANN201 - a Flask app (gunicorn's app-factory convention)
    """The Flask app: ``POST /`` with a pickled ``{"images": [jpeg bytes], "prompts": [...]}``
    returns a pickled ``{"scores": [float]}``."""
    from flask import Flask, Response, request
    from PIL import Image

    from dancegrpo_rewards.base import RewardBatch

    reward = _baseline_reward(os.environ.get("BASELINE_REWARD", "clip"))
    reward.load()
    reward.warmup()
    # Like our server, run the model on one dedicated thread (see bench_serving.py).
    model_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="model")
    app = Flask(__name__)

    @app.route("/", methods=["POST"])
    def score() -> Response:
        data = pickle.loads(request.get_data())  # baseline only: trusted loopback client
        images = [np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in data["images"]]
        n = len(images)
        batch = RewardBatch(data["prompts"], images, [None] * n, [None] * n)
        out = model_thread.submit(reward.score, batch).result()
        body = {"scores": out["score"].tolist()}
        return Response(pickle.dumps(body), mimetype="application/octet-stream")

    return app


def _baseline_reward(kind: str):  # noqa: ANN202 - a dancegrpo_rewards Reward
    """The same reward our server hosts in the comparison."""
    if kind == "brightness":
        from dancegrpo_rewards.kinds.weight_free import Brightness

        return Brightness("brightness", {})
    from clip_fixture import reward_options
    from dancegrpo_rewards.kinds.clip_score import CLIPScoreReward

    return CLIPScoreReward("clip", reward_options(os.environ["BASELINE_CHECKPOINT"]))


def score_over_http(session, url: str, images: np.ndarray, prompts: list[str], chunk: int):
    """The client side: JPEG-encode (quality 95), pickle, POST each chunk in turn."""
    from PIL import Image

    scores: list[float] = []
    for start in range(0, len(images), chunk):
        jpegs = []
        for image in images[start : start + chunk]:
            buffer = io.BytesIO()
            Image.fromarray(image).save(buffer, format="JPEG", quality=95)
            jpegs.append(buffer.getvalue())
        payload = pickle.dumps({"images": jpegs, "prompts": prompts[start : start + chunk]})
        reply = session.post(url, data=payload, timeout=120)
        reply.raise_for_status()
        scores.extend(pickle.loads(reply.content)["scores"])  # baseline only, see above
    return np.asarray(scores, np.float32)
