"""``vlm_judge``: a vision-language model scores images through an OpenAI-compatible API.

The judge runs elsewhere — vLLM or SGLang serving UnifiedReward, Qwen2.5-VL or any instruct
VLM (``vllm serve ... --served-model-name NAME``) — and this kind sends each sample as one
``POST {base_url}/chat/completions`` request: a user turn holding the image(s) as
``data:`` URLs and the configured instruction with the sample's prompt in place of
``{prompt}``. The reply becomes a number in one of two ways (``mode``):

- ``regex``: each configured pattern's first capture group, searched (``re.search``, first
  match) in the reply text, times ``score_scale``; one output per pattern. Flow-GRPO's
  UnifiedReward reward (``flow_grpo/rewards.py``, ``unifiedreward_score_sglang``) is the
  default: its instruction, ``Final Score:\\s*([1-5](?:\\.\\d+)?)``, scale 1/5.
- ``yes_no``: the probability of "Yes" at the first generated token, from
  ``top_logprobs``: ``P(yes) / (P(yes) + P(no))``, where ``P(yes)`` sums the probabilities
  of the listed tokens that equal ``yes_token`` after stripping whitespace, ignoring case
  (likewise "No"). A token missing from the list counts 0; both missing is an error.

A judge that cannot be reached, answers with an HTTP error, or replies without a parsable
score raises ``JudgeError`` naming the endpoint, the sample and the reply: the server turns
that into ``INTERNAL`` for that request (never a silent 0). Connection errors, timeouts and
HTTP 408/425/429/5xx are retried with capped, jittered exponential backoff; requests run
concurrently up to ``max_concurrency``. Only the standard library is used (``urllib``).
"""

from __future__ import annotations

import base64
import concurrent.futures
import dataclasses
import hashlib
import io
import json
import math
import os
import random
import re
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from dancegrpo_rewards.base import Reward, RewardBatch, RewardConfigError
from dancegrpo_rewards.kinds.options import OptionError, parse_options

DOCS_SECTION = "vlm_judge"

#: Flow-GRPO's UnifiedReward instruction (``unifiedreward_score_sglang``); ``{prompt}`` is
#: replaced by the sample's prompt. Its leading ``<image>`` tag is dropped: the image goes
#: in its own content part, as Flow-GRPO also sends it.
FLOW_GRPO_UNIFIEDREWARD_TEMPLATE = (
    "You are given a text caption and a generated image based on that caption. Your task is "
    "to evaluate this image based on two key criteria:\n"
    "1. Alignment with the Caption: Assess how well this image aligns with the provided "
    "caption. Consider the accuracy of depicted objects, their relationships, and attributes "
    "as described in the caption.\n"
    "2. Overall Image Quality: Examine the visual quality of this image, including clarity, "
    "detail preservation, color accuracy, and overall aesthetic appeal.\n"
    "Based on the above criteria, assign a score from 1 to 5 after 'Final Score:'.\n"
    "Your task is provided as follows:\nText Caption: [{prompt}]"
)
FLOW_GRPO_SCORE_PATTERN = r"Final Score:\s*([1-5](?:\.\d+)?)"
_RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
_OUTPUT_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_MAX_EXCERPT = 300


class JudgeError(RuntimeError):
    """The judge failed for one sample: unreachable, an HTTP error, or no parsable score."""


@dataclasses.dataclass(frozen=True)
class VLMJudgeOptions:
    """Options of the ``vlm_judge`` kind (see docs/rewards.md, section ``vlm_judge``).

    Attributes:
        base_url: the API root, e.g. ``http://judge:8000/v1`` (``/chat/completions`` is added).
        model: the served model name (vLLM ``--served-model-name``).
        mode: ``regex`` (parse a score from the reply) or ``yes_no`` (token probability).
        prompt_template: the instruction; ``{prompt}`` is replaced by the sample's prompt.
        system_prompt: an optional system turn.
        score_patterns: ``regex`` mode: ``{output name: regex}``, each with one capture group.
        score_scale: ``regex`` mode: each parsed number is multiplied by this.
        yes_token, no_token: ``yes_no`` mode: the two answers (whitespace and case ignored).
        top_logprobs: ``yes_no`` mode: alternatives requested for the first token.
        max_tokens: ``regex`` mode: reply length limit (``yes_no`` asks for 1 token).
        temperature: sampling temperature (0 = greedy, reproducible).
        image_format: ``png`` (lossless) or ``jpeg`` (UnifiedReward's own client: quality 95).
        jpeg_quality: JPEG quality when ``image_format`` is ``jpeg``.
        resize_to: resize images to this square size first (Flow-GRPO: 512); 0 keeps them.
        send_condition_image: send the sample's condition image before it (editing judges).
        extra_body: more JSON fields for every request (e.g. ``chat_template_kwargs``).
        api_key_env: environment variable holding a bearer token (never the token itself).
        timeout_s: per-attempt HTTP timeout.
        max_retries: retries after the first attempt on retryable failures.
        backoff_initial_s, backoff_max_s: retry ``k`` sleeps ``U(0, min(max, initial·2^k))``.
        max_concurrency: requests in flight at once for one batch.
        check_model: at load, ``GET {base_url}/models`` must list ``model``.
    """

    base_url: str | None = None
    model: str | None = None
    mode: str = "regex"
    prompt_template: str = FLOW_GRPO_UNIFIEDREWARD_TEMPLATE
    system_prompt: str | None = None
    score_patterns: Mapping[str, Any] | None = None
    score_scale: float = 1.0
    yes_token: str = "Yes"
    no_token: str = "No"
    top_logprobs: int = 20
    max_tokens: int = 512
    temperature: float = 0.0
    image_format: str = "png"
    jpeg_quality: int = 95
    resize_to: int = 0
    send_condition_image: bool = False
    extra_body: Mapping[str, Any] | None = None
    api_key_env: str | None = None
    timeout_s: float = 60.0
    max_retries: int = 3
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 8.0
    max_concurrency: int = 8
    check_model: bool = True

    def __post_init__(self) -> None:
        if not self.base_url or not self.base_url.startswith(("http://", "https://")):
            raise OptionError("base_url", f"required: an http(s) URL, got {self.base_url!r}")
        if not self.model:
            raise OptionError("model", "required: the served model name")
        if self.mode not in ("regex", "yes_no"):
            raise OptionError("mode", f"must be 'regex' or 'yes_no', got {self.mode!r}")
        for name, pattern in (self.score_patterns or {}).items():
            self._check_pattern(name, pattern)
        if self.mode == "yes_no" and self.score_patterns:
            raise OptionError("score_patterns", "only used with mode: regex")
        if not math.isfinite(self.score_scale) or self.score_scale == 0:
            raise OptionError("score_scale", f"must be finite and non-zero, got {self.score_scale}")
        for key in ("yes_token", "no_token"):
            if not getattr(self, key).strip():
                raise OptionError(key, "must not be empty")
        if self.yes_token.strip().lower() == self.no_token.strip().lower():
            raise OptionError("no_token", "must differ from yes_token")
        positive = ("top_logprobs", "max_tokens", "max_concurrency")
        for key in positive:
            if getattr(self, key) < 1:
                raise OptionError(key, f"must be >= 1, got {getattr(self, key)}")
        if not 0.0 <= self.temperature <= 2.0:
            raise OptionError("temperature", f"must be in [0, 2], got {self.temperature}")
        if self.image_format not in ("png", "jpeg"):
            raise OptionError("image_format", f"must be 'png' or 'jpeg', got {self.image_format!r}")
        if not 1 <= self.jpeg_quality <= 100:
            raise OptionError("jpeg_quality", f"must be in [1, 100], got {self.jpeg_quality}")
        if self.resize_to < 0:
            raise OptionError("resize_to", f"must be >= 0, got {self.resize_to}")
        if self.max_retries < 0:
            raise OptionError("max_retries", f"must be >= 0, got {self.max_retries}")
        for key in ("timeout_s", "backoff_initial_s", "backoff_max_s"):
            if not getattr(self, key) > 0:
                raise OptionError(key, f"must be > 0, got {getattr(self, key)}")
        if self.api_key_env is not None and not self.api_key_env:
            raise OptionError("api_key_env", "must name an environment variable")

    @staticmethod
    def _check_pattern(name: Any, pattern: Any) -> None:
        key = f"score_patterns.{name}"
        if not isinstance(name, str) or not _OUTPUT_NAME.match(name):
            raise OptionError(key, "output names are lower-case identifiers, e.g. 'alignment'")
        if not isinstance(pattern, str):
            raise OptionError(key, f"expected a regex string, got {pattern!r}")
        try:
            groups = re.compile(pattern).groups
        except re.error as err:
            raise OptionError(key, f"invalid regex ({err})") from None
        if groups != 1:
            raise OptionError(key, f"needs exactly one capture group (the number), has {groups}")

    @property
    def patterns(self) -> dict[str, re.Pattern[str]]:
        """``regex`` mode: the compiled patterns by output name (default Flow-GRPO's)."""
        raw = self.score_patterns or {"score": FLOW_GRPO_SCORE_PATTERN}
        return {name: re.compile(pattern) for name, pattern in raw.items()}


def image_data_url(image: np.ndarray, *, fmt: str, quality: int, resize_to: int) -> str:
    """``data:image/<fmt>;base64,...`` of a ``uint8 [H, W, 3]`` RGB image."""
    from PIL import Image

    pil = Image.fromarray(np.ascontiguousarray(image), mode="RGB")
    if resize_to:
        pil = pil.resize((resize_to, resize_to), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    if fmt == "jpeg":
        pil.save(buffer, format="JPEG", quality=quality)
    else:
        pil.save(buffer, format="PNG")
    return f"data:image/{fmt};base64,{base64.b64encode(buffer.getvalue()).decode('ascii')}"


def parse_regex_scores(
    reply: str, patterns: Mapping[str, re.Pattern[str]], scale: float
) -> dict[str, float] | str:
    """``{output: scale · number}`` from the reply, or a message saying what is missing."""
    scores = {}
    for name, pattern in patterns.items():
        match = pattern.search(reply)
        if match is None:
            return f"no match for {name!r} pattern {pattern.pattern!r}"
        try:
            value = float(match.group(1))
        except ValueError:
            return f"{name!r} pattern captured {match.group(1)!r}, not a number"
        if not math.isfinite(value):
            return f"{name!r} pattern captured {match.group(1)!r}, not a finite number"
        scores[name] = value * scale
    return scores


def yes_probability(
    top_logprobs: Sequence[Mapping[str, Any]], yes_token: str, no_token: str
) -> float | str:
    """``P(yes) / (P(yes) + P(no))`` over the listed first-token alternatives, or a message.

    ``top_logprobs`` is OpenAI's list of ``{"token": str, "logprob": float}``.
    """
    yes, no = yes_token.strip().lower(), no_token.strip().lower()
    p_yes = p_no = 0.0
    for entry in top_logprobs:
        token = str(entry.get("token", "")).strip().lower()
        if token in (yes, no):
            probability = math.exp(float(entry["logprob"]))
            if token == yes:
                p_yes += probability
            else:
                p_no += probability
    if p_yes + p_no <= 0.0:
        listed = [entry.get("token") for entry in top_logprobs]
        return (
            f"neither {yes_token!r} nor {no_token!r} among the first token's alternatives {listed}"
        )
    return p_yes / (p_yes + p_no)


def _excerpt(text: str) -> str:
    return text if len(text) <= _MAX_EXCERPT else text[:_MAX_EXCERPT] + "..."


class VLMJudgeReward(Reward):
    """A VLM judge behind an OpenAI-compatible endpoint (vLLM, SGLang)."""

    kind = "vlm_judge"
    modality = "image"
    description = "VLM judge over an OpenAI-compatible chat API (parsed score or P(Yes))"
    requires_prompt = True

    def __init__(self, name: str, options: Mapping[str, Any]) -> None:
        super().__init__(name, options)
        self.config = parse_options(VLMJudgeOptions, options, reward_name=name)
        self.requires_prompt = "{prompt}" in self.config.prompt_template
        self.requires_condition_image = self.config.send_condition_image
        self._patterns = self.config.patterns
        if self.config.mode == "yes_no":
            self._outputs: tuple[str, ...] = ("score",)
        else:
            self._outputs = tuple(self._patterns)
        self._url = self.config.base_url.rstrip("/") + "/chat/completions"  # type: ignore[union-attr]
        self._api_key = self._read_api_key()
        identity = {
            f.name: getattr(self.config, f.name)
            for f in dataclasses.fields(self.config)
            if f.name
            not in (
                "base_url",  # replicas of one judge share a version
                "api_key_env",
                "timeout_s",
                "max_retries",
                "backoff_initial_s",
                "backoff_max_s",
                "max_concurrency",
                "check_model",
            )
        }
        payload = json.dumps(identity, sort_keys=True, default=str)
        self._version = f"{self.kind}-{hashlib.sha256(payload.encode()).hexdigest()[:16]}"
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    def _read_api_key(self) -> str | None:
        env = self.config.api_key_env
        if env is None:
            return None
        value = os.environ.get(env)
        if not value:
            raise RewardConfigError(
                f"reward {self.name!r}: option 'api_key_env': environment variable {env!r} "
                "is not set"
            )
        return value

    @property
    def output_names(self) -> tuple[str, ...]:
        return self._outputs

    @property
    def version(self) -> str:
        return self._version

    def load(self) -> None:
        """Starts the request pool; with ``check_model``, checks the judge serves ``model``."""
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=self.config.max_concurrency, thread_name_prefix=f"judge-{self.name}"
        )
        if not self.config.check_model:
            return
        url = self.config.base_url.rstrip("/") + "/models"  # type: ignore[union-attr]
        try:
            listing = self._request("GET", url, None)
        except JudgeError as err:
            raise RewardConfigError(
                f"reward {self.name!r}: option 'base_url': the judge at {self.config.base_url} "
                f"does not answer GET /models ({err}); start it first or set check_model: false"
            ) from None
        served = [str(m.get("id")) for m in listing.get("data", []) if isinstance(m, Mapping)]
        if self.config.model not in served:
            raise RewardConfigError(
                f"reward {self.name!r}: option 'model': {self.config.model!r} is not served by "
                f"{self.config.base_url} (it serves {served})"
            )

    # -- HTTP ---------------------------------------------------------------------------

    def _request(self, method: str, url: str, body: Mapping[str, Any] | None) -> dict[str, Any]:
        """One JSON request with retries; returns the decoded reply or raises ``JudgeError``."""
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        attempts = self.config.max_retries + 1
        problem = ""
        for attempt in range(attempts):
            if attempt:
                cap = min(
                    self.config.backoff_max_s, self.config.backoff_initial_s * 2 ** (attempt - 1)
                )
                time.sleep(random.uniform(0.0, cap))
            request = urllib.request.Request(url, data=data, headers=headers, method=method)
            try:
                with urllib.request.urlopen(request, timeout=self.config.timeout_s) as reply:
                    text = reply.read().decode("utf-8", errors="replace")
            except urllib.error.HTTPError as err:
                detail = err.read().decode("utf-8", errors="replace")
                problem = f"HTTP {err.code} from {url}: {_excerpt(detail)}"
                if err.code in _RETRY_STATUS:
                    continue
                raise JudgeError(problem) from None
            except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
                reason = getattr(err, "reason", err)
                problem = f"{url} unreachable or too slow ({type(err).__name__}: {reason})"
                continue
            try:
                decoded = json.loads(text)
            except json.JSONDecodeError:
                raise JudgeError(f"{url} answered non-JSON: {_excerpt(text)!r}") from None
            if not isinstance(decoded, dict):
                raise JudgeError(f"{url} answered {_excerpt(text)!r}, not a JSON object")
            return decoded
        raise JudgeError(f"{problem} (after {attempts} attempts)")

    # -- scoring ------------------------------------------------------------------------

    def request_body(self, prompt: str, images: Sequence[np.ndarray]) -> dict[str, Any]:
        """The ``/chat/completions`` body for one sample (images in order, then the text)."""
        config = self.config
        content: list[dict[str, Any]] = [
            {
                "type": "image_url",
                "image_url": {
                    "url": image_data_url(
                        image,
                        fmt=config.image_format,
                        quality=config.jpeg_quality,
                        resize_to=config.resize_to,
                    )
                },
            }
            for image in images
        ]
        content.append({"type": "text", "text": config.prompt_template.replace("{prompt}", prompt)})
        messages: list[dict[str, Any]] = []
        if config.system_prompt:
            messages.append({"role": "system", "content": config.system_prompt})
        messages.append({"role": "user", "content": content})
        body: dict[str, Any] = {
            **(config.extra_body or {}),
            "model": config.model,
            "messages": messages,
            "temperature": config.temperature,
        }
        if config.mode == "yes_no":
            body.update(max_tokens=1, logprobs=True, top_logprobs=config.top_logprobs)
        else:
            body["max_tokens"] = config.max_tokens
        return body

    def reply_text(self, index: int, prompt: str, images: Sequence[np.ndarray]) -> str:
        """The judge's reply text to one request (the images in order, then the
        instruction); raises ``JudgeError`` naming the judge and batch sample ``index``.
        Used by judges that parse replies themselves (``pairwise_preference``)."""
        where, reply = self._ask(index, prompt, images)
        try:
            text = reply["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError) as err:
            raise JudgeError(
                f"{where}: unexpected reply shape ({type(err).__name__}: {err}): "
                f"{_excerpt(json.dumps(reply))}"
            ) from None
        if not isinstance(text, str):
            raise JudgeError(f"{where}: message.content is not text: {_excerpt(json.dumps(reply))}")
        return text

    def _ask(
        self, index: int, prompt: str, images: Sequence[np.ndarray]
    ) -> tuple[str, dict[str, Any]]:
        """``(where, reply)``: the judge's JSON reply to one request, and the words that
        name the judge and batch sample ``index`` in every error about it."""
        where = f"reward {self.name!r}: judge {self.config.model!r} at {self.config.base_url}, batch sample {index}"
        try:
            return where, self._request("POST", self._url, self.request_body(prompt, images))
        except JudgeError as err:
            raise JudgeError(f"{where}: {err}") from None

    def _judge_one(self, index: int, prompt: str, images: Sequence[np.ndarray]) -> dict[str, float]:
        where, reply = self._ask(index, prompt, images)
        try:
            choice = reply["choices"][0]
            if self.config.mode == "yes_no":
                alternatives = choice["logprobs"]["content"][0]["top_logprobs"]
                result: float | str | dict[str, float] = yes_probability(
                    alternatives, self.config.yes_token, self.config.no_token
                )
            else:
                text = choice["message"]["content"]
                if not isinstance(text, str):
                    raise TypeError("message.content is not text")
                result = parse_regex_scores(text, self._patterns, self.config.score_scale)
        except (KeyError, IndexError, TypeError) as err:
            raise JudgeError(
                f"{where}: unexpected reply shape ({type(err).__name__}: {err}): "
                f"{_excerpt(json.dumps(reply))}"
            ) from None
        if isinstance(result, str):
            shown = json.dumps(reply) if self.config.mode == "yes_no" else text
            raise JudgeError(f"{where}: {result}; reply: {_excerpt(shown)!r}")
        return result if isinstance(result, dict) else {"score": result}

    def score(self, batch: RewardBatch) -> dict[str, np.ndarray]:
        """One request per sample, ``max_concurrency`` at a time; float32 ``(N,)`` per output."""
        if self._pool is None:
            self.load()
        assert self._pool is not None
        futures = []
        for index in range(len(batch)):
            images = [batch.media[index]]
            if self.config.send_condition_image:
                condition = batch.condition_images[index]
                if condition is None:
                    raise JudgeError(f"reward {self.name!r}: sample {index} has no condition image")
                images.insert(0, condition)
            futures.append(self._pool.submit(self._judge_one, index, batch.prompts[index], images))
        results = [future.result() for future in futures]
        return {name: np.asarray([r[name] for r in results], np.float32) for name in self._outputs}
