"""Prompt texts shared by inference, evaluation and training, kept in one place."""

from __future__ import annotations

MEMORY_START = "<|memory_start|>"
MEMORY = "<|memory|>"
MEMORY_END = "<|memory_end|>"
MEMORY_TOKENS = (MEMORY_START, MEMORY, MEMORY_END)

# Chat format of the released (Qwen3 instruct) decoder; used when a tokenizer has no template.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def memory_region(num_latents: int) -> str:
    """Inline text of one memory region: start tag, one placeholder per latent, end tag."""
    return MEMORY_START + MEMORY * num_latents + MEMORY_END


def question_prompt(context: str, question: str) -> str:
    """Question over a document; `context` is raw text or a memory region."""
    return f"Answer the question using the document.\n\nDocument:\n{context}\n\nQuestion: {question.strip()}"


def reconstruction_prompt(context: str) -> str:
    """Ask the decoder to reproduce the text behind a memory region verbatim."""
    return f"{context}\n\nRepeat the text above exactly."


def expand_prompt(chunk_contexts: list[str], expanded: dict[int, str], question: str) -> str:
    """EXPAND agent prompt: every chunk compressed, expanded chunks in full below."""
    lines = [f"The document is split into {len(chunk_contexts)} chunks, each shown in compressed form."]
    lines += [f"Chunk {i}: {context}" for i, context in enumerate(chunk_contexts)]
    if expanded:
        lines.append("\nFull text of expanded chunks:")
        for index in sorted(expanded):
            lines.append(f"### Chunk {index}\n{expanded[index]}")
    lines.append(f"\nQuestion: {question.strip()}")
    lines.append(
        'To read chunks in full, reply "EXPAND: i, j" with their numbers. '
        'When you can answer, reply "ANSWER: " followed by the answer.'
    )
    return "\n".join(lines)
