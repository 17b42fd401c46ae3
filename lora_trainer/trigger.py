"""Tokenizer checks: captions that overflow CLIP's 77-token window, and trigger words that already mean something.

Both take a `CLIPTokenizer` (the base model's; `models.load_tokenizer(base)` gives it) and return
dataclasses the Captions tab shows next to each caption.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

CLIP_WINDOW = 77  # positions in CLIP's text encoder ...
CAPTION_TOKEN_LIMIT = CLIP_WINDOW - 2  # ... of which BOS and EOS take two; tokens past this are cut off

# Words with a strong meaning to Stable Diffusion that a trigger word would fight with.
STRONG_MEANINGS = {
    "sks": "the SKS rifle: guns leak into the images (it is only the DreamBooth paper's example)",
    **dict.fromkeys(
        ["elon", "musk", "trump", "obama", "biden", "putin", "taylor", "swift", "emma", "watson", "beyonce",
         "rihanna", "einstein", "keanu", "zendaya", "scarlett"], "a celebrity"),
    **dict.fromkeys(
        ["picasso", "gogh", "vangogh", "monet", "rembrandt", "dali", "warhol", "banksy", "rutkowski", "mucha",
         "ghibli", "artgerm", "giger", "hokusai"], "an artist or studio style"),
    **dict.fromkeys(
        ["disney", "pixar", "marvel", "pokemon", "pikachu", "mario", "batman", "superman", "barbie", "lego",
         "nike", "apple", "tesla", "mickey", "simpsons", "artstation", "unreal", "octane"], "a brand or franchise"),
}

COMMON_WORDS = frozenset("""
a an the of in on at with and or by for to from is it this that my your his her their our
man woman men women girl boy person people child children kid baby lady guy face portrait body hair eyes
dog cat bird horse fish cow animal pet lion tiger bear wolf fox rabbit
car house home tree trees flower flowers sky sun moon star water sea ocean lake river beach mountain forest
city street road building room table chair window door bed book phone computer cup bottle food
style art photo photograph picture image painting drawing illustration sketch render anime cartoon comic
digital oil watercolor pencil ink realistic detailed masterpiece quality
red blue green yellow black white orange purple pink brown gray grey gold silver dark light bright
big small large little old young new good bad beautiful cute pretty happy sad
day night morning evening summer winter spring autumn fall rain snow fire ice
king queen prince princess knight warrior wizard witch robot monster dragon angel demon god
shirt dress hat shoes jacket coat glasses
one two three top bottom left right front back side view close up full
token word name thing stuff object subject model character style
""".split())

# Made-up words that few tokenizers know as a whole; checked against the actual tokenizer before suggesting.
RARE_CANDIDATES = ["ohwx", "zwx", "qwx", "vkz", "xjq", "zkp", "pqz", "bxj", "wvx", "kzr", "mxv", "jxq"]


@dataclass(frozen=True)
class CaptionLength:
    caption: str
    tokens: int  # without BOS/EOS
    limit: int = CAPTION_TOKEN_LIMIT
    overflow: str = ""  # the text past the limit: the model never sees it
    image: Path | None = None

    @property
    def too_long(self) -> bool:
        return self.tokens > self.limit

    def message(self) -> str:
        if not self.too_long:
            return f"{self.tokens}/{self.limit} tokens"
        return f"{self.tokens}/{self.limit} tokens: too long, '{self.overflow}' is cut off; shorten the caption"


@dataclass(frozen=True)
class TriggerAnalysis:
    word: str
    tokens: list[str]  # how the tokenizer splits it ("</w>" word-end markers removed)
    warnings: list[str] = field(default_factory=list)
    suggestions: list[str] = field(default_factory=list)  # rare alternatives, when there are warnings

    @property
    def ok(self) -> bool:
        return not self.warnings


def caption_length(caption: str, tokenizer, image: Path | None = None) -> CaptionLength:
    tokens = tokenizer.tokenize(caption)
    overflow = ""
    if len(tokens) > CAPTION_TOKEN_LIMIT:  # the caption's own words from the first token cut (CLIP's BPE pieces read badly)
        offsets = tokenizer(caption, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        overflow = caption[offsets[CAPTION_TOKEN_LIMIT][0]:].strip()
    return CaptionLength(caption, len(tokens), CAPTION_TOKEN_LIMIT, overflow, image)


def check_caption_lengths(entries: Iterable, tokenizer) -> list[CaptionLength]:
    """Token count of every caption (`CaptionEntry`s from `scan_captions`); `.too_long` flags overflow."""
    return [caption_length(e.caption, tokenizer, e.image) for e in entries]


def analyse_trigger(word: str, tokenizer, max_suggestions: int = 4) -> TriggerAnalysis:
    """How `word` tokenizes, and warnings when it already means something to the model."""
    word = word.strip()
    if not word:
        return TriggerAnalysis(word, [], ["no trigger word: the LoRA will apply to every prompt"],
                               rare_suggestions(tokenizer, max_suggestions))
    tokens = tokenizer.tokenize(word)
    warnings: list[str] = []
    for part in word.lower().split():
        if part in STRONG_MEANINGS:
            warnings.append(f"'{part}' already means {STRONG_MEANINGS[part]}; pick a made-up word")
        elif part in COMMON_WORDS and _is_whole_word_token(part, tokenizer):
            warnings.append(f"'{part}' is a common word the model already knows; training on it changes every "
                            "prompt that uses it, so pick a made-up word")
    if len(tokens) > 3:
        warnings.append(f"splits into {len(tokens)} tokens; a short made-up word of 1-2 tokens is learned faster")
    if "," in word:
        warnings.append("contains a comma: caption shuffling splits tags at commas and would separate it")
    suggestions = [s for s in rare_suggestions(tokenizer, max_suggestions + 1) if s != word.lower()] if warnings else []
    return TriggerAnalysis(word, [_display(t) for t in tokens], warnings, suggestions[:max_suggestions])


def rare_suggestions(tokenizer, n: int = 4) -> list[str]:
    """Made-up words that tokenize to at most two pieces with this tokenizer, fewest pieces first."""
    scored = [(len(tokenizer.tokenize(c)), i, c) for i, c in enumerate(RARE_CANDIDATES)]
    return [c for count, _, c in sorted(scored) if count <= 2][:n]


def _is_whole_word_token(word: str, tokenizer) -> bool:
    tokens = tokenizer.tokenize(word)
    return len(tokens) == 1 and tokens[0].endswith("</w>")


def _display(token: str) -> str:
    return token.removesuffix("</w>")
