"""Varied prompts for parity tests: short, medium, code, chat-formatted, and a long multi-block one."""

SHORT = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "Water boils at",
    "List three primary colors:",
    "The quick brown fox",
    "import numpy as np\n\nx = np.arange(10)\n",
    "Q: What is the largest planet in the solar system?\nA:",
    "Translate to French: Good morning, how are you?",
    "1, 2, 3, 4, 5,",
    "In machine learning, overfitting means",
    "SELECT name FROM users WHERE",
    "The theory of relativity was proposed by",
    "A haiku about the sea:\n",
    "Photosynthesis is the process by which",
    "<|im_start|>user\nGive me a tip for learning to cook.<|im_end|>\n<|im_start|>assistant\n",
    "The history of the Roman Empire began",
    "To make a cup of tea, first",
    "Ünïcödé tëxt and emoji 🙂 are",
]

_PARAGRAPHS = [
    "The river wound through the valley, past farms and mills that had stood for centuries.",
    "Engineers measured the bridge each spring, noting every crack and every repair.",
    "In the market square, merchants sold bread, cheese, apples and woollen cloth.",
    "The library kept maps of the region drawn by hand, some older than the town itself.",
    "Children learned arithmetic by counting sheep on the hills above the school.",
    "When winter came, the roads closed and the village relied on its own stores.",
]


def long_prompt(min_tokens: int, tokenizer) -> str:
    parts, i = [], 0
    while len(tokenizer(" ".join(parts)).input_ids) < min_tokens:
        parts.append(f"Chapter {i}: " + _PARAGRAPHS[i % len(_PARAGRAPHS)])
        i += 1
    return " ".join(parts) + " In summary, the story is about"


def parity_prompts(tokenizer) -> list[str]:
    return SHORT + [long_prompt(600, tokenizer), long_prompt(200, tokenizer)]
