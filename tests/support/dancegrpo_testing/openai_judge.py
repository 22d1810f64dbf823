"""A local OpenAI-compatible judge server for the ``vlm_judge`` tests (no network).

``serve_judge(backend, model=...)`` runs a stdlib ``ThreadingHTTPServer`` on a free
loopback port in a background thread and yields its ``base_url`` (``http://127.0.0.1:P/v1``).
It answers the two routes the kind uses, in the OpenAI / vLLM wire format:

- ``GET /v1/models`` → ``{"object": "list", "data": [{"id": model, ...}]}``;
- ``POST /v1/chat/completions`` → ``choices[0].message.content`` and, when the request asks
  for ``logprobs``, ``choices[0].logprobs.content[i].top_logprobs`` (``{"token", "logprob"}``).

Image parts must be ``data:image/...;base64,`` URLs; they are decoded with PIL to
``uint8 [H, W, 3]`` and handed, with the text parts, to a backend:

- ``TinyVLMJudge``: a real, tiny random-weight Qwen2-VL (transformers) behind the chat
  format; greedy generation for the content and the log-softmax of its next-token logits
  for ``top_logprobs``. ``yes_probability`` computes P(Yes)/(P(Yes)+P(No)) directly from the
  full vocabulary, the reference the tests compare the HTTP path with.
- ``RuleJudge``: replies ``"Final Score: <1 + 4 * mean pixel / 255>"`` (4 decimals), so
  tests can check that the pixels and the instruction arrive intact.

``faults`` (a list shared with the test) injects failures, one per request, in order:
``("status", 503)`` answers that HTTP status, ``("sleep", s)`` waits ``s`` seconds first,
``("content", text)`` replaces the reply text. ``requests`` records every decoded body,
``authorization`` every ``Authorization`` header, ``max_in_flight`` the most
chat requests handled at once.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import io
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np

from dancegrpo_testing.tokenizers import train_byte_level_bpe
from dancegrpo_testing.videoalign_models import QWEN2_VL_TOKENS, tiny_config, tiny_processor

#: The chat format of the tiny judge (Qwen2-VL's, one user turn; images before the text).
USER_TURN = "<|im_start|>user\n{images}{text}<|im_end|>\n<|im_start|>assistant\n"
IMAGE_SLOT = "<|vision_start|><|image_pad|><|vision_end|>"
_CORPUS = [
    "Yes No Yes No yes no. Answer Yes or No. Does this image show the caption? Final Score: 1 2 "
    "3 4 5. You are given a text caption and a generated image based on that caption.",
    "a red cube on a table, a dog, sunset over the sea, a photo, two cats, a bowl of fruit",
]


def decode_data_url(url: str) -> np.ndarray:
    """``uint8 [H, W, 3]`` of a ``data:image/...;base64,`` URL."""
    from PIL import Image

    head, _, payload = url.partition(",")
    if not (head.startswith("data:image/") and head.endswith(";base64")):
        raise ValueError(f"not a base64 image data URL: {url[:40]!r}")
    with Image.open(io.BytesIO(base64.b64decode(payload))) as image:
        return np.asarray(image.convert("RGB"))


@dataclasses.dataclass(frozen=True)
class ChatInput:
    """What a backend sees of one request: images (in order) and the joined text parts."""

    images: list[np.ndarray]
    text: str
    max_tokens: int
    top_logprobs: int | None


def write_tiny_vlm_judge(directory: str | Path, *, seed: int = 0) -> Path:
    """A tiny random-weight Qwen2-VL judge folder (model, tokenizer, processor)."""
    import torch
    from transformers import Qwen2Tokenizer, Qwen2VLForConditionalGeneration

    directory = Path(directory)
    bpe = train_byte_level_bpe(_CORPUS, list(QWEN2_VL_TOKENS), vocab_size=400)
    tokenizer = Qwen2Tokenizer(tokenizer_object=bpe)
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(tiny_config(tokenizer, len(tokenizer))).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # a visible weight scale, so the answer depends on the image
        for name, param in model.named_parameters():
            if name.endswith("weight") and param.ndim >= 2:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    model.save_pretrained(directory)
    tiny_processor(tokenizer).save_pretrained(directory)
    return directory


class TinyVLMJudge:
    """A tiny Qwen2-VL answering chat requests (greedy), with next-token log-probabilities."""

    def __init__(self, folder: str | Path) -> None:
        from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

        self.processor = AutoProcessor.from_pretrained(str(folder), local_files_only=True)
        self.model = Qwen2VLForConditionalGeneration.from_pretrained(
            str(folder), local_files_only=True
        ).eval()
        self.lock = threading.Lock()  # one forward at a time (the HTTP server is threaded)

    def _inputs(self, images: list[np.ndarray], text: str) -> Any:
        from PIL import Image

        chat = USER_TURN.format(images=IMAGE_SLOT * len(images), text=text)
        pil = [Image.fromarray(image) for image in images] or None
        return self.processor(text=[chat], images=pil, return_tensors="pt")

    def next_token_logprobs(self, images: list[np.ndarray], text: str):
        """``[V]`` float32 log-softmax of the first answer token's logits."""
        import torch

        with self.lock, torch.no_grad():
            logits = self.model(**self._inputs(images, text)).logits[0, -1].float()
        return torch.log_softmax(logits, dim=-1)

    def yes_probability(self, images: list[np.ndarray], text: str) -> float:
        """P(Yes) / (P(Yes) + P(No)) over every vocabulary entry whose decoded text is
        "yes" / "no" after stripping whitespace, ignoring case (the reference)."""
        logprobs = self.next_token_logprobs(images, text).exp()
        tokenizer = self.processor.tokenizer
        p = {"yes": 0.0, "no": 0.0}
        for token_id in range(logprobs.shape[0]):
            word = tokenizer.decode([token_id]).strip().lower()
            if word in p:
                p[word] += float(logprobs[token_id])
        return p["yes"] / (p["yes"] + p["no"])

    def __call__(self, chat: ChatInput) -> tuple[str, list[dict[str, Any]] | None]:
        import torch

        tokenizer = self.processor.tokenizer
        logprobs = None
        if chat.top_logprobs is not None:
            first = self.next_token_logprobs(chat.images, chat.text)
            values, ids = torch.topk(first, min(chat.top_logprobs, first.shape[0]))
            logprobs = [
                {
                    "token": tokenizer.decode([int(ids[0])]),
                    "logprob": float(values[0]),
                    "top_logprobs": [
                        {"token": tokenizer.decode([int(i)]), "logprob": float(v)}
                        for v, i in zip(values, ids, strict=True)
                    ],
                }
            ]
        inputs = self._inputs(chat.images, chat.text)
        with self.lock, torch.no_grad():
            out = self.model.generate(
                **inputs, max_new_tokens=chat.max_tokens, do_sample=False, pad_token_id=0
            )
        text = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        return text, logprobs


class RuleJudge:
    """Replies ``Final Score: {1 + 4 * mean pixel / 255:.4f}`` for the first image."""

    def __call__(self, chat: ChatInput) -> tuple[str, list[dict[str, Any]] | None]:
        value = 1 + 4 * float(chat.images[0].mean()) / 255 if chat.images else 0.0
        return f"Reasoning... the caption was read.\nFinal Score: {value:.4f}", None


@dataclasses.dataclass
class JudgeServer:
    """A running judge: its ``base_url``, the request log and the fault queue."""

    base_url: str
    requests: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    faults: list[tuple[str, Any]] = dataclasses.field(default_factory=list)
    authorization: list[str | None] = dataclasses.field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0


def _make_handler(backend: Any, model: str, state: JudgeServer) -> type[BaseHTTPRequestHandler]:
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:  # quiet
            del args

        def _send(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            if self.path.rstrip("/") == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": model, "object": "model"}]})
            else:
                self._send(404, {"error": {"message": f"no route {self.path}"}})

        def do_POST(self) -> None:  # noqa: N802
            length = int(self.headers.get("Content-Length", 0))
            body = json.loads(self.rfile.read(length))
            with lock:
                state.requests.append(body)
                state.authorization.append(self.headers.get("Authorization"))
                fault = state.faults.pop(0) if state.faults else None
                state.in_flight += 1
                state.max_in_flight = max(state.max_in_flight, state.in_flight)
            try:
                self._answer(body, fault)
            finally:
                with lock:
                    state.in_flight -= 1

        def _answer(self, body: dict[str, Any], fault: tuple[str, Any] | None) -> None:
            if fault and fault[0] == "sleep":
                time.sleep(fault[1])
            if fault and fault[0] == "status":
                self._send(fault[1], {"error": {"message": "injected failure"}})
                return
            if self.path != "/v1/chat/completions":
                self._send(404, {"error": {"message": f"no route {self.path}"}})
                return
            if body.get("model") != model:
                self._send(404, {"error": {"message": f"model {body.get('model')!r} not found"}})
                return
            images, texts = [], []
            for message in body["messages"]:
                content = message["content"]
                parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
                for part in parts:
                    if part["type"] == "image_url":
                        images.append(decode_data_url(part["image_url"]["url"]))
                    elif message["role"] == "user":
                        texts.append(part["text"])
            chat = ChatInput(
                images=images,
                text="".join(texts),
                max_tokens=int(body.get("max_tokens", 16)),
                top_logprobs=int(body.get("top_logprobs", 0)) if body.get("logprobs") else None,
            )
            text, logprobs = backend(chat)
            if fault and fault[0] == "content":
                text = fault[1]
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "stop",
            }
            if logprobs is not None:
                choice["logprobs"] = {"content": logprobs}
            self._send(200, {"object": "chat.completion", "model": model, "choices": [choice]})

    return Handler


@contextlib.contextmanager
def serve_judge(backend: Any, *, model: str = "tiny-judge") -> Iterator[JudgeServer]:
    """Serves ``backend`` on ``http://127.0.0.1:<free port>/v1`` until the block exits."""
    state = JudgeServer(base_url="")
    server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(backend, model, state))
    server.daemon_threads = True
    state.base_url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
