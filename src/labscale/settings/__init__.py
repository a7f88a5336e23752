"""Prompting settings: zero-shot, few-shot:K, cot. They build prompts only; the engine runs them."""
