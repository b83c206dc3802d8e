"""Prompts for calibration and for the verification report.

Two disjoint sets: calibration measures δ on ``CALIBRATION``; the report's honest and
attack messages use ``EVALUATION``, so the false-positive figures are measured on
prompts δ was not fitted to. Each message is (prompt, sampler parameters, seed):
many messages reuse a prompt under other seeds and parameters.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

CALIBRATION: tuple[str, ...] = (
    "Explain why the sky is blue.",
    "Write a haiku about autumn leaves.",
    "What is the capital of Australia?",
    "List three uses of copper.",
    "Translate 'good morning' into French and Spanish.",
    "Summarise the plot of Romeo and Juliet in two sentences.",
    "How do vaccines train the immune system?",
    "Give me a recipe for pancakes.",
    "What is 17 times 23?",
    "Describe a cat to someone who has never seen one.",
    "Write a Python function that reverses a string.",
    "Why do we have seasons on Earth?",
    "Name four planets and one fact about each.",
    "What does a compiler do?",
    "Suggest a name for a bakery by the sea.",
    "Tell me a short story about a lighthouse keeper.",
    # Added for long outputs (issue 16: calibrate on outputs of 128 tokens and more).
    "Explain how a refrigerator keeps food cold, step by step.",
    "Write a letter to a friend describing a trip to the mountains.",
    "Compare trains and aeroplanes for travelling across Europe.",
    "Describe how bread is made, from flour to loaf.",
    "What should someone know before adopting a dog?",
    "Explain the causes of the First World War.",
    "Write a short essay on why people enjoy music.",
    "How does the internet deliver a web page to a browser?",
    "Give advice to a student starting university.",
    "Describe the life cycle of a butterfly in detail.",
    "Explain how to plant and care for a vegetable garden.",
    "Write a story about a robot who learns to paint.",
    "What are the pros and cons of working from home?",
    "Explain how solar panels turn sunlight into electricity.",
    "Describe a busy market in a city you imagine.",
    "Explain the difference between stocks and bonds.",
)

EVALUATION: tuple[str, ...] = (
    "What is the boiling point of water at sea level?",
    "Write a limerick about a programmer.",
    "Explain photosynthesis to a ten-year-old.",
    "What are the main causes of inflation?",
    "Give three tips for learning a new language.",
    "Describe the water cycle.",
    "Who wrote Pride and Prejudice, and what is it about?",
    "How does a bicycle stay upright?",
    "Write a polite email declining a meeting.",
    "What is the difference between weather and climate?",
    "Explain what a hash function is.",
    "Write a four-line poem about the ocean.",
    "How many minutes are there in a day? Show the working.",
    "What is machine learning?",
    "Describe your ideal weekend.",
    "Why is exercise good for the heart?",
    "List the days of the week in reverse order.",
    "What is the tallest mountain in the world?",
    "Explain the rules of chess in brief.",
    "Write a short dialogue between a robot and a child.",
    "What is a prime number? Give examples.",
    "How do airplanes fly?",
    "Recommend three classic novels.",
    "What happens when you mix red and blue paint?",
    "Explain the difference between a virus and a bacterium.",
    "Write a tweet announcing a new coffee shop.",
    "What is the Pythagorean theorem?",
    "Describe the taste of a lemon.",
    "How do I make a paper airplane?",
    "What are renewable energy sources?",
    "Tell me a joke about computers.",
    "Explain why the moon has phases.",
    # Added for long outputs (issue 16: honest messages of 64 tokens and more).
    "Write a short story about a dragon who is afraid of fire.",
    "Explain how the heart pumps blood around the body.",
    "Describe the history of the printing press.",
    "Give a detailed plan for a week of healthy meals.",
    "Explain how a car engine works.",
    "Write a speech for a school graduation.",
    "What are the benefits and risks of social media?",
    "Describe how glaciers shape the landscape.",
    "Explain the rules of football to a beginner.",
    "Write a diary entry of a sailor in a storm.",
    "How do bees make honey? Explain in detail.",
    "Describe the differences between cats and dogs as pets.",
    "Explain how elections work in a democracy.",
    "Write a fairy tale about a clever fox.",
    "What makes a good teacher? Give reasons.",
    "Explain how recycling plastic works.",
)


def encode_prompts(tokenizer: Any, texts: Sequence[str], chat: bool) -> list[tuple[int, ...]]:
    """Token ids of each prompt: the chat template with a generation prompt when the
    tokenizer has one and ``chat`` is set (instruction models), else plain text."""
    out = []
    for text in texts:
        if chat and getattr(tokenizer, "chat_template", None):
            ids = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "keys"):
                ids = ids["input_ids"]
        else:
            ids = tokenizer(text)["input_ids"]
        out.append(tuple(int(i) for i in ids))
    return out


__all__ = ["CALIBRATION", "EVALUATION", "encode_prompts"]
