"""The pairwise judges of ``pairwise_preference``: who wins between two samples of a group.

A judge is built from the ``judge:`` options (its ``type`` picks the class) and answers,
for a batch and a list of ordered index pairs ``(first, second)``, the first sample's share
of the win: 1, 0, or ½ for a tie (soft judges may answer anything in [0, 1]).
``requirements`` is the per-sample reward whose needs (prompt, condition image, metadata,
modality) and sample checks the outer reward adopts.
"""

from __future__ import annotations

import abc
import concurrent.futures
import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from dancegrpo_rewards.base import Reward, RewardBatch, RewardConfigError
from dancegrpo_rewards.kinds.checkpoints import version_string
from dancegrpo_rewards.kinds.options import OptionError, parse_options

#: UnifiedReward-Think's pairwise image instruction, byte for byte as Pref-GRPO sends it
#: (``get_unifiedreward_think_image_template`` in ``fastvideo/rewards/templates.py``, with
#: ``{prompt}`` replaced by the caption): the judge reasons in ``<think>`` and answers
#: ``<answer>Image 1 is better</answer>`` or ``... Image 2 ...``. It is the model's input
#: format (the judge was trained on it), so it is kept verbatim; SHA-256 pinned in the tests.
UNIFIEDREWARD_THINK_IMAGE_TEMPLATE = "\n".join(
    (
        "You are an objective and precise evaluator for image quality comparison. I will provide you with a text caption and two images generated based on this caption. You must analyze the two images carefully and determine which image is better.",
        "",
        "        Evaluation procedure:",
        "",
        "        1. The caption for the generated images is: 「{prompt}」. You must evaluate the two images across these core dimensions:",
        "        - Semantic consistency (how closely the image content aligns with the caption)",
        "        - Aesthetics (composition, color usage, artistic expression)",
        "        - Authenticity (realism and attention to detail)",
        "",
        "        2. You are also encouraged to add up to two additional evaluation dimensions if they are relevant to the specific caption or images (e.g., creativity, spatial layout, fine-grained detail). If no extra dimensions are relevant, just keep the three core dimensions.",
        "",
        "        3. For each evaluation dimension:",
        "        - Provide a score between 1–10 for both Image 1 and Image 2",
        "        - Provide a short rationale for each score (2–5 short sentences)",
        "        - The evaluation must follow exactly this format with line breaks and indentation:",
        "            Dimension name: ",
        "                Image 1 (x/10) - rationale; ",
        "                Image 2 (y/10) - rationale",
        "",
        "        4. After evaluating all dimensions, calculate the total score for each image and show the calculation explicitly, following this exact format:",
        "            Total score:",
        "            Image 1: x+x+x=total",
        "            Image 2: y+y+y=total",
        "",
        "        5. Wrap all reasoning and scoring strictly within <think> and </think> tags.",
        "",
        "        6. After </think>, output the final judgment strictly inside <answer> and </answer> tags, containing only one of:",
        "        - Image 1 is better",
        "        - Image 2 is better",
        "",
        "        Constraints:",
        "        - You must strictly follow the line breaks, indentation, and formatting shown in the example below.",
        "        - Do not merge multiple dimensions into one line. Each dimension must follow the 3-line block format shown below.",
        "        - Do not use Markdown formatting, bullet points, bold text, or headings.",
        "        - Do not output explanations outside <think> and <answer>.",
        "        - The <answer> tag must contain only the final string with no extra words.",
        "",
        "        Required output format:",
        "",
        "        <think>",
        "        1. Semantic consistency: ",
        "            Image 1 (9/10) - ...; ",
        "            Image 2 (7/10) - ...",
        "        2. Aesthetics: ",
        "            Image 1 (8/10) - ...; ",
        "            Image 2 (8/10) - ...",
        "        3. Authenticity: ",
        "            Image 1 (8/10) - ...; ",
        "            Image 2 (5/10) - ...",
        "        [Additional dimension if any]: ",
        "            Image 1 (7/10) - ...; ",
        "            Image 2 (8/10) - ...",
        "        [Additional dimension if any]: ",
        "            Image 1 (6/10) - ...; ",
        "            Image 2 (7/10) - ...",
        "        Total score:",
        "        Image 1: 9+8+8+7+6=38",
        "        Image 2: 7+8+5+8+7=35",
        "        </think>",
        "        <answer>Image 1 is better</answer>",
        "",
        "        Note: The example above is only to illustrate the exact format (line breaks, indentation, symbols, and style). Your actual evaluation must follow this format exactly, but be based on the given caption and images.",
        "        ",
    )
)
#: Pref-GRPO's answer parsing (``_extract_answer`` / ``_pairwise_win_rate``).
UNIFIEDREWARD_THINK_ANSWER_PATTERN = r"<answer>(.*?)</answer>"


class PairwiseJudge(abc.ABC):
    """Decides pairs of samples. ``name`` is ``<reward>.judge``; ``options`` its mapping."""

    @property
    @abc.abstractmethod
    def requirements(self) -> Reward:
        """The per-sample reward whose needs and sample checks the outer reward adopts."""

    @property
    @abc.abstractmethod
    def version(self) -> str:
        """A stable version string of the judge (inner reward version and options)."""

    def load(self) -> None:  # noqa: B027 - optional hook
        """Loads weights / checks the judge endpoint (called once before serving)."""

    @abc.abstractmethod
    def compare(self, batch: RewardBatch, pairs: Sequence[tuple[int, int]]) -> list[float]:
        """The first sample's share of the win for each ``(first, second)`` pair."""


@dataclasses.dataclass(frozen=True)
class ScoreJudgeOptions:
    """Options of the ``score`` judge.

    Attributes:
        reward: the per-sample reward that scores each sample, ``{kind: ..., <options>}``.
        output: which of its outputs decides (default: its first output).
        margin: scores within this distance are a tie (½ each); ``0``: only equal scores tie.
    """

    reward: dict[str, Any] | None = None
    output: str | None = None
    margin: float = 0.0

    def __post_init__(self) -> None:
        if not self.reward:
            raise OptionError("reward", "required: the per-sample reward, {kind: ..., <options>}")
        if not (np.isfinite(self.margin) and self.margin >= 0):
            raise OptionError("margin", f"must be finite and >= 0, got {self.margin}")


class ScoreJudge(PairwiseJudge):
    """Win if ``score(first) - score(second) > margin``, loss if ``< -margin``, else a tie.

    Every sample is scored once by the inner reward (a batch-invariant per-sample reward,
    so scoring the whole batch equals scoring each group), then the pairs are compared.
    """

    def __init__(self, name: str, options: Mapping[str, Any]) -> None:
        from dancegrpo_rewards.kinds.composite import build_inner_reward

        self.config = parse_options(ScoreJudgeOptions, options, reward_name=name)
        assert self.config.reward is not None
        self.inner = build_inner_reward(name, self.config.reward)
        if self.inner.group_wise:
            raise RewardConfigError(
                f"reward {name!r}: option 'reward': kind {self.inner.kind!r} is group-wise; "
                "the score judge needs a per-sample reward"
            )
        self.output = self.config.output or self.inner.output_names[0]
        if self.output not in self.inner.output_names:
            raise RewardConfigError(
                f"reward {name!r}: option 'output': {self.output!r} is not an output of kind "
                f"{self.inner.kind!r} (outputs: {', '.join(self.inner.output_names)})"
            )
        self._version = version_string(
            "score",
            {"reward": self.inner.version},
            {"output": self.output, "margin": self.config.margin},
        )

    @property
    def requirements(self) -> Reward:
        return self.inner

    @property
    def version(self) -> str:
        return self._version

    def load(self) -> None:
        self.inner.load()

    def compare(self, batch: RewardBatch, pairs: Sequence[tuple[int, int]]) -> list[float]:
        scores = np.asarray(
            self.inner.score(dataclasses.replace(batch, group_sizes=None))[self.output],
            np.float64,
        )
        margin = self.config.margin
        out = []
        for i, j in pairs:
            diff = scores[i] - scores[j]
            out.append(1.0 if diff > margin else 0.0 if diff < -margin else 0.5)
        return out


#: Options of the ``vlm`` judge that are its own (the rest go to the ``vlm_judge`` client).
_VLM_PAIRWISE_KEYS = ("first_wins", "second_wins", "answer_pattern", "unparsed")
#: ``vlm_judge`` options that have no meaning for a pairwise judge.
_VLM_REJECTED_KEYS = (
    "mode",
    "score_patterns",
    "score_scale",
    "yes_token",
    "no_token",
    "top_logprobs",
)
#: The ``vlm`` judge's defaults where they differ from ``vlm_judge``'s: Pref-GRPO's
#: request (``vllm_utils/vllm_request.py``: JPEG quality 95, up to 4096 new tokens).
_VLM_DEFAULTS = {
    "prompt_template": UNIFIEDREWARD_THINK_IMAGE_TEMPLATE,
    "image_format": "jpeg",
    "jpeg_quality": 95,
    "max_tokens": 4096,
}


@dataclasses.dataclass(frozen=True)
class VLMPairwiseOptions:
    """The ``vlm`` judge's own options.

    Attributes:
        first_wins, second_wins: the answer strings meaning "the first / second image is
            better" (searched in the captured answer, ``first_wins`` first).
        answer_pattern: regex whose first capture group is the answer (DOTALL).
        unparsed: ``tie`` (Pref-GRPO: no answer tag, or neither string → ½ each) or
            ``error`` (fail the request with the reply).
    """

    first_wins: str = "Image 1 is better"
    second_wins: str = "Image 2 is better"
    answer_pattern: str = UNIFIEDREWARD_THINK_ANSWER_PATTERN
    unparsed: str = "tie"

    def __post_init__(self) -> None:
        for key in ("first_wins", "second_wins"):
            if not getattr(self, key):
                raise OptionError(key, "must not be empty")
        if self.first_wins == self.second_wins:
            raise OptionError("second_wins", "must differ from first_wins")
        try:
            groups = re.compile(self.answer_pattern).groups
        except re.error as err:
            raise OptionError("answer_pattern", f"invalid regex ({err})") from None
        if groups != 1:
            raise OptionError("answer_pattern", f"needs exactly one capture group, has {groups}")
        if self.unparsed not in ("tie", "error"):
            raise OptionError("unparsed", f"must be 'tie' or 'error', got {self.unparsed!r}")


def parse_pairwise_answer(reply: str, options: VLMPairwiseOptions) -> float | None:
    """The first image's share of the win from a judge reply: 1, 0, ½ (an answer naming
    neither), or ``None`` when the reply has no answer (``unparsed`` decides)."""
    match = re.search(options.answer_pattern, reply, re.DOTALL)
    if match is None:
        return None
    answer = match.group(1).strip()
    if options.first_wins in answer:
        return 1.0
    if options.second_wins in answer:
        return 0.0
    return 0.5


class VLMPairwiseJudge(PairwiseJudge):
    """Shows the two images (in pair order) and the instruction to a VLM behind an
    OpenAI-compatible API, through the ``vlm_judge`` kind's client (its retries,
    timeouts, API key and errors); one request per ordered pair, ``max_concurrency`` at
    a time. With ``send_condition_image`` the sample's condition image goes first
    (editing judges). A failed request fails the batch (never a silent tie)."""

    def __init__(self, name: str, options: Mapping[str, Any]) -> None:
        from dancegrpo_rewards.kinds.vlm_judge import VLMJudgeReward

        for key in _VLM_REJECTED_KEYS:
            if key in options:
                raise OptionError(key, "not used by the pairwise vlm judge (it parses an answer)")
        own = {k: v for k, v in options.items() if k in _VLM_PAIRWISE_KEYS}
        self.config = parse_options(VLMPairwiseOptions, own, reward_name=name)
        client = {**_VLM_DEFAULTS, **{k: v for k, v in options.items() if k not in own}}
        self.client = VLMJudgeReward(name, client)
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._version = version_string(
            "vlm", {"client": self.client.version}, dataclasses.asdict(self.config)
        )

    @property
    def requirements(self) -> Reward:
        return self.client

    @property
    def version(self) -> str:
        return self._version

    def load(self) -> None:
        self.client.load()
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=self.client.config.max_concurrency,
            thread_name_prefix=f"pairwise-{self.client.name}",
        )

    def _judge(self, batch: RewardBatch, first: int, second: int) -> float:
        from dancegrpo_rewards.kinds.vlm_judge import JudgeError

        images = [batch.media[first], batch.media[second]]
        if self.client.config.send_condition_image:
            condition = batch.condition_images[first]
            if condition is None:
                raise JudgeError(f"{self.client.name}: sample {first} has no condition image")
            images.insert(0, condition)
        reply = self.client.reply_text(first, batch.prompts[first], images)
        share = parse_pairwise_answer(reply, self.config)
        if share is None:
            if self.config.unparsed == "error":
                excerpt = reply if len(reply) <= 300 else reply[:300] + "..."
                raise JudgeError(
                    f"{self.client.name}: pair ({first}, {second}): no answer matching "
                    f"{self.config.answer_pattern!r} in the reply {excerpt!r}"
                )
            share = 0.5
        return share

    def compare(self, batch: RewardBatch, pairs: Sequence[tuple[int, int]]) -> list[float]:
        if self._pool is None:
            self.load()
        assert self._pool is not None
        futures = [self._pool.submit(self._judge, batch, i, j) for i, j in pairs]
        return [future.result() for future in futures]


#: ``judge.type`` → judge class.
JUDGE_TYPES: dict[str, type[PairwiseJudge]] = {"score": ScoreJudge, "vlm": VLMPairwiseJudge}
