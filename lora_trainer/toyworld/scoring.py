"""Judged figures of the toy world: how well the base draws it, and what a LoRA does to it.

- `base_quality`: the base's pictures of every scene, judged: the share that shows what its caption
  says, and the share that shows any style (it never saw one, so this should stay near zero);
- `lora_quality`: a LoRA's pictures of the evaluation prompts (never in a style dataset's captions),
  with and without the trigger word, at several strengths: style rate (share judged in the style),
  adherence (share that shows what the prompt says) and leak (style rate without the trigger).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from . import BASE_SPEC, SCENES, SIZE, TRIGGER, eval_prompts, judge, with_trigger

SAMPLE_STEPS = 20
GUIDANCE = 7.0


def _generator(base: str):
    from ..inference import Generator

    return Generator(base)


def _pictures(gen, prompts: list[str], seeds: list[int], loras=None, *, steps: int, guidance: float):
    asked = [(p, s) for p in prompts for s in seeds]
    return gen.generate_many([p for p, _ in asked], [s for _, s in asked], loras, steps=steps, guidance=guidance, size=SIZE)


def base_quality(base: str = BASE_SPEC, per_scene: int = 2, *, steps: int = SAMPLE_STEPS, guidance: float = GUIDANCE) -> dict:
    """Every scene of the world drawn `per_scene` times by the base, judged."""
    gen = _generator(base)
    prompts = [s.caption for s in SCENES]
    seeds = list(range(per_scene))
    verdicts = judge(_pictures(gen, prompts, seeds, steps=steps, guidance=guidance))
    asked = [p for p in prompts for _ in seeds]
    hits = [v.matches(p) for v, p in zip(verdicts, asked, strict=True)]
    return {
        "images": len(verdicts),
        "accuracy": sum(hits) / len(hits),
        "style_rate": sum(v.style is not None for v in verdicts) / len(verdicts),
    }


@dataclass
class LoraScores:
    strength: float
    style: float  # share of triggered pictures judged in the style
    adherence: float  # share of triggered pictures that show what the prompt says
    leak: float  # share of untriggered pictures judged in the style
    adherence_untriggered: float

    def as_dict(self) -> dict:
        return asdict(self)


def lora_quality(
    lora: str | Path | None, style: str, *, base: str = BASE_SPEC, strengths: tuple[float, ...] = (0.5, 1.0),
    prompts: list[str] | None = None, seeds: tuple[int, ...] = (0, 1), trigger: str = TRIGGER, position: str = "first",
    steps: int = SAMPLE_STEPS, guidance: float = GUIDANCE,
) -> list[LoraScores]:
    """Judged style, adherence and leak of a LoRA file (or of the base alone with `lora=None`)."""
    from ..inference import LoraSpec

    gen = _generator(base)
    prompts = prompts or eval_prompts()
    rows = []
    for strength in strengths:
        loras = [LoraSpec(str(lora), strength)] if lora else []
        scores = {}
        for triggered in (True, False):
            asked = [with_trigger(p, trigger, position) if triggered else p for p in prompts]
            verdicts = judge(_pictures(gen, asked, list(seeds), loras, steps=steps, guidance=guidance))
            content = [p for p in prompts for _ in seeds]
            scores[triggered] = (
                sum(v.style == style for v in verdicts) / len(verdicts),
                sum(v.matches(p) for v, p in zip(verdicts, content, strict=True)) / len(verdicts),
            )
        rows.append(LoraScores(strength, scores[True][0], scores[True][1], scores[False][0], scores[False][1]))
    return rows
