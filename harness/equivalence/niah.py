"""Needle in a haystack: prompt construction, exact-match scoring, the grid (its heatmap and table:
harness.equivalence.niah_views).

Construction follows gkamradt's LLMTest_NeedleInAHaystack: real text (bundled under
data/haystack/) is cut to the context length, and the needle sentence is inserted at the sentence
boundary at or before `depth` percent of the haystack's tokens. The needles follow RULER's
"special magic number" task: a unique key and a seven-digit value that occurs nowhere else in the
prompt (the haystack holds no digits at all), so the answer can be checked exactly.

Scoring reads only the generated answer span, i.e. the last `answer_tokens` ids of the output
(generation is forced to exactly that many tokens), takes the first run of digits in it and
compares it with the needle's value. The prompt ends with an answer prefix that repeats the
question ("The special magic number for X mentioned in the text is"), as RULER does, so a small
chat model answers with the number instead of rephrasing the question.
"""

from __future__ import annotations

import dataclasses
import random
import re
from dataclasses import dataclass, field

from harness.config import DATA_DIR, read_thresholds_section
from harness.errors import HarnessUsageError

HAYSTACK_DIR = DATA_DIR / "haystack"

# Keys a model cannot guess from the haystack (Python reference prose): fruits and colours.
NEEDLE_KEYS = ("the orange kite", "the silver lantern", "the green violin", "the amber compass",
               "the purple harbour", "the copper teapot", "the crimson glacier", "the ivory tram",
               "the golden meadow", "the teal observatory", "the scarlet bakery", "the indigo ferry")


@dataclass(frozen=True)
class PromptFormat:
    """How a NIAH prompt is phrased. {context} is the haystack with the needle, {key} the needle key."""

    needle: str = "The special magic number for {key} is {value}."
    user: str = ("Read the following text and remember the special magic numbers in it.\n\n{context}\n\n"
                 "What is the special magic number for {key} mentioned in the text above? "
                 "Answer with the number only.")
    answer_prefix: str = "The special magic number for {key} mentioned in the text is"
    chat_template: bool | None = None  # None: use the model's chat template when it has one


@dataclass(frozen=True)
class NiahConfig:
    """The grid and its acceptance rule. Context length counts prompt + answer tokens, so the
    longest cell of a model with an 8192-token window is 8192."""

    lengths: tuple[int, ...] = (256, 1024, 2048)
    depths: tuple[float, ...] = (0.0, 50.0, 100.0)
    needles: int = 2
    answer_tokens: int = 10
    # RULER calls a length "effective" when the score there is at least 85.6 % (Llama-2-7B's
    # score at 4k tokens); we accept a context length on the same rule, averaged over its cells.
    min_accuracy: float = 0.856
    # The context length the model must retrieve at (None: every length of the grid). Longer cells
    # are still run and reported, with the effective context length (the longest length scoring
    # min_accuracy or more), but do not fail the run: e.g. SmolLM2-135M's window is 8192 tokens,
    # its measured effective context 2048 (H100, bf16: 100 % at 2048, 80 % at 4096).
    required_context: int | None = None
    seed: int = 0
    prompt: PromptFormat = field(default_factory=PromptFormat)

    def capped(self, max_context: int | None) -> "NiahConfig":
        """The grid without lengths beyond the model's window (None: no limit known)."""
        if not max_context:
            return self
        return dataclasses.replace(self, lengths=tuple(n for n in self.lengths if n <= max_context))


CI_GRID = NiahConfig()
# The full grid: up to the model's window, 5 depths, 4 needles per cell (lengths above the
# window are dropped by NiahConfig.capped).
FULL_GRID = NiahConfig(lengths=(1024, 2048, 4096, 6144, 8192, 16384, 32768, 65536, 131072),
                       depths=(0.0, 25.0, 50.0, 75.0, 100.0), needles=4)


def load_config(thresholds_file: str | None, base: NiahConfig) -> NiahConfig:
    """`base` with the "niah" section of the --thresholds JSON applied, e.g.
    {"niah": {"lengths": [1024, 4096], "depths": [0, 50, 100], "needles": 3, "min_accuracy": 0.9,
              "required_context": 4096, "prompt": {"chat_template": false}}}. Unknown keys are errors."""
    section = read_thresholds_section(thresholds_file, "niah")
    known = {f.name for f in dataclasses.fields(NiahConfig)}
    unknown = sorted(set(section) - known)
    if unknown:
        raise HarnessUsageError(f"--thresholds: unknown niah key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    values = dict(section)
    if "prompt" in values:
        prompt_known = {f.name for f in dataclasses.fields(PromptFormat)}
        bad = sorted(set(values["prompt"]) - prompt_known)
        if bad:
            raise HarnessUsageError(f"--thresholds: unknown niah.prompt key(s) {', '.join(bad)}; known: {', '.join(sorted(prompt_known))}")
        values["prompt"] = dataclasses.replace(base.prompt, **values["prompt"])
    for name in ("lengths", "depths"):
        if name in values:
            values[name] = tuple(values[name])
    config = dataclasses.replace(base, **values)
    if not config.lengths or any(n < 64 for n in config.lengths):
        raise HarnessUsageError(f"--thresholds: niah lengths must be >= 64 tokens, got {list(config.lengths)}")
    if any(not 0 <= d <= 100 for d in config.depths) or not config.depths:
        raise HarnessUsageError(f"--thresholds: niah depths must be percentages in [0, 100], got {list(config.depths)}")
    if not 1 <= config.needles <= len(NEEDLE_KEYS):
        raise HarnessUsageError(f"--thresholds: niah needles must be 1..{len(NEEDLE_KEYS)}, got {config.needles}")
    return config


# ---------------------------------------------------------------------------------------------
# Haystack and needles


def haystack_sentences() -> list[str]:
    """The bundled text split into sentences (each ends with its full stop)."""
    text = " ".join(p.read_text() for p in sorted(HAYSTACK_DIR.glob("*.txt")))
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if s.strip()]
    if not sentences:
        raise HarnessUsageError(f"no haystack text under {HAYSTACK_DIR}")
    return sentences


@dataclass(frozen=True)
class Needle:
    key: str
    value: str

    def sentence(self, fmt: PromptFormat) -> str:
        return fmt.needle.format(key=self.key, value=self.value)


def make_needles(count: int, seed: int = 0) -> list[Needle]:
    """`count` needles with distinct keys and distinct seven-digit values, fixed by `seed`."""
    rng = random.Random(seed)
    keys = rng.sample(NEEDLE_KEYS, count)
    values = rng.sample(range(1_000_000, 10_000_000), count)
    return [Needle(k, str(v)) for k, v in zip(keys, values)]


@dataclass
class NiahPrompt:
    input_ids: list[int]
    needle: Needle
    context_length: int
    depth: float
    needle_sentence_index: int  # where in the haystack the needle went (sentences before it)
    haystack_sentences: int
    text: str


def _use_chat(tokenizer, fmt: PromptFormat) -> bool:
    has = bool(getattr(tokenizer, "chat_template", None))
    if fmt.chat_template and not has:
        raise HarnessUsageError("niah prompt.chat_template is true but the tokenizer has no chat template")
    return has if fmt.chat_template is None else fmt.chat_template


def _render(tokenizer, fmt: PromptFormat, context: str, needle: Needle) -> str:
    user = fmt.user.format(context=context, key=needle.key)
    prefix = fmt.answer_prefix.format(key=needle.key)
    if _use_chat(tokenizer, fmt):
        head = tokenizer.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True,
                                             tokenize=False)
        return head + prefix
    bos = tokenizer.bos_token or ""
    return f"{bos}{user}\n\n{prefix}"


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


class HaystackBuilder:
    """Builds NIAH prompts of an exact token budget from the bundled text for one tokenizer."""

    def __init__(self, tokenizer, fmt: PromptFormat = PromptFormat()):
        self.tokenizer, self.fmt = tokenizer, fmt
        self.sentences = haystack_sentences()
        self.sentence_tokens = [len(_encode(tokenizer, " " + s)) for s in self.sentences]

    def build(self, context_length: int, depth: float, needle: Needle, answer_tokens: int) -> NiahPrompt:
        """A prompt of at most context_length - answer_tokens tokens, the needle at `depth` %."""
        budget = context_length - answer_tokens
        overhead = len(_encode(self.tokenizer, _render(self.tokenizer, self.fmt, needle.sentence(self.fmt), needle)))
        count, used = 0, 0
        while count < len(self.sentences) and used + self.sentence_tokens[count] <= budget - overhead:
            used += self.sentence_tokens[count]
            count += 1
        if count == len(self.sentences) and used + overhead < budget * 0.9:
            raise HarnessUsageError(f"the bundled haystack ({used} tokens) is too short for a {context_length}-token "
                                    f"prompt; add text under {HAYSTACK_DIR}")
        while True:
            prompt = self._assemble(count, depth, needle)
            if len(prompt.input_ids) <= budget or count == 0:
                return prompt
            count -= 1  # joining sentences can tokenise a little longer than their sum

    def _assemble(self, count: int, depth: float, needle: Needle) -> NiahPrompt:
        hay = self.sentences[:count]
        tokens = self.sentence_tokens[:count]
        total, target, index, running = sum(tokens), sum(tokens) * depth / 100.0, 0, 0
        # the sentence boundary at or before `depth` percent of the haystack's tokens
        while index < count and running + tokens[index] <= target + 1e-9:
            running += tokens[index]
            index += 1
        if depth >= 100.0:
            index = count
        context = " ".join(hay[:index] + [needle.sentence(self.fmt)] + hay[index:])
        text = _render(self.tokenizer, self.fmt, context, needle)
        return NiahPrompt(input_ids=_encode(self.tokenizer, text), needle=needle, context_length=total,
                          depth=depth, needle_sentence_index=index, haystack_sentences=count, text=text)


def prompt_problems(prompt: NiahPrompt, fmt: PromptFormat, context_length: int, answer_tokens: int) -> list[str]:
    """Why a prompt would make its cell vacuous or wrong; empty when it is sound."""
    problems = []
    if prompt.text.count(prompt.needle.sentence(fmt)) != 1:
        problems.append(f"needle sentence appears {prompt.text.count(prompt.needle.sentence(fmt))} times, not once")
    if prompt.text.count(prompt.needle.value) != 1:
        problems.append(f"answer {prompt.needle.value} appears {prompt.text.count(prompt.needle.value)} times in the prompt, not once")
    if len(prompt.input_ids) > context_length - answer_tokens:
        problems.append(f"prompt has {len(prompt.input_ids)} tokens, over the {context_length - answer_tokens} budget")
    if len(prompt.input_ids) < 0.8 * (context_length - answer_tokens):
        problems.append(f"prompt has {len(prompt.input_ids)} tokens, far below the {context_length - answer_tokens} budget")
    return problems


# ---------------------------------------------------------------------------------------------
# Generation and scoring


def generate_answer(model, input_ids: list[int], answer_tokens: int, pad_token_id: int):
    """Greedy, forced to exactly `answer_tokens` new tokens; returns the whole output sequence (1-D)."""
    import torch

    ids = torch.tensor([input_ids], device=model.device)
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=answer_tokens,
                             min_new_tokens=answer_tokens, do_sample=False, pad_token_id=pad_token_id)
    return out[0].cpu()


def answer_span(sequence, answer_tokens: int):
    """The generated tokens: the last `answer_tokens` ids (generation is forced to that length)."""
    return sequence[len(sequence) - answer_tokens:]


def extract_number(text: str) -> str | None:
    match = re.search(r"\d+", text)
    return match.group(0) if match else None


@dataclass(frozen=True)
class CellScore:
    length: int
    depth: float
    key: str
    expected: str
    found: str | None
    answer: str
    prompt_tokens: int

    @property
    def correct(self) -> bool:
        return self.found == self.expected


def score_sequence(tokenizer, sequence, answer_tokens: int, prompt: NiahPrompt, length: int) -> CellScore:
    """Exact match of the first number in the answer span with the needle's value."""
    answer = tokenizer.decode(answer_span(sequence, answer_tokens), skip_special_tokens=True)
    return CellScore(length=length, depth=prompt.depth, key=prompt.needle.key, expected=prompt.needle.value,
                     found=extract_number(answer), answer=answer, prompt_tokens=len(prompt.input_ids))


def scorer_controls(tokenizer, prompt: NiahPrompt, answer_tokens: int, length: int) -> list[str]:
    """Run the scorer on the real prompt followed by a made-up right and a made-up wrong answer;
    a scorer that reads anything but the answer span (e.g. the prompt, which holds the needle)
    accepts the wrong one. Returns the problems found."""
    import torch

    def forced(text: str):
        ids = _encode(tokenizer, text)[:answer_tokens]
        ids += [tokenizer.eos_token_id] * (answer_tokens - len(ids))
        return torch.tensor(prompt.input_ids + ids)

    wrong_value = str((int(prompt.needle.value) + 4_321_987) % 9_000_000 + 1_000_000)
    problems = []
    if not score_sequence(tokenizer, forced(f" {prompt.needle.value}."), answer_tokens, prompt, length).correct:
        problems.append("scorer rejects the right answer placed in the answer span")
    if score_sequence(tokenizer, forced(f" {wrong_value}."), answer_tokens, prompt, length).correct:
        problems.append("scorer accepts a wrong answer: it reads outside the generated answer span")
    return problems


def run_cell(model, tokenizer, builder: HaystackBuilder, length: int, depth: float, needle: Needle,
             answer_tokens: int) -> tuple[CellScore, NiahPrompt]:
    prompt = builder.build(length, depth, needle, answer_tokens)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sequence = generate_answer(model, prompt.input_ids, answer_tokens, pad)
    return score_sequence(tokenizer, sequence, answer_tokens, prompt, length), prompt


def accuracy(scores) -> float:
    scores = list(scores)
    return sum(s.correct for s in scores) / len(scores) if scores else float("nan")


def effective_context(scores, lengths, min_accuracy: float) -> int | None:
    """RULER's effective length: the longest grid length whose accuracy, and every shorter one's,
    is at least min_accuracy (None when even the shortest misses)."""
    effective = None
    for n in sorted(lengths):
        cells = [s for s in scores if s.length == n]
        if not cells or accuracy(cells) < min_accuracy:
            break
        effective = n
    return effective
