"""One question through each API dialect's own official client, against a running pdcluster.

pdcluster answers the Ollama API, Anthropic's Messages API and OpenAI's
Responses API beside the chat completions (docs/api.md). This asks the same
question, streamed, through the ``ollama``, ``anthropic`` and ``openai``
clients, then asks a follow-up in each, and prints every answer.

    pdc up --model tiny-llama &                 # or any running cluster
    python examples/api_clients.py --url http://127.0.0.1:8000 [--api-key KEY]
"""
from __future__ import annotations

import argparse

QUESTION = "What is the capital of France?"
FOLLOW_UP = "And of Italy?"


def ask_ollama(url: str, api_key: str | None, model: str, history: list[dict]) -> str:
    import ollama

    client = ollama.Client(host=url, timeout=120, headers={"Authorization": f"Bearer {api_key}"} if api_key else None)
    parts = client.chat(model=model, messages=history, options={"temperature": 0, "num_predict": 48}, stream=True)
    return "".join(part.message.content for part in parts)


def ask_anthropic(url: str, api_key: str | None, model: str, history: list[dict]) -> str:
    import anthropic

    client = anthropic.Anthropic(base_url=url, api_key=api_key or "unused", timeout=120, max_retries=0)
    with client.messages.stream(model=model, max_tokens=48, messages=history,
                                extra_body={"temperature": 0}) as stream:
        return "".join(stream.text_stream)


def ask_responses(url: str, api_key: str | None, model: str, history: list[dict]) -> str:
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key=api_key or "unused", timeout=120, max_retries=0)
    events = client.responses.create(model=model, input=history, max_output_tokens=48, temperature=0, stream=True)
    return "".join(e.delta for e in events if e.type == "response.output_text.delta")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the scheduler (pdc serve / pdc up)")
    parser.add_argument("--api-key", default=None, help="the scheduler's --api-key, if it has one")
    args = parser.parse_args()
    import openai

    models = openai.OpenAI(base_url=args.url + "/v1", api_key=args.api_key or "unused", timeout=30).models.list()
    model = models.data[0].id
    for name, ask in (("ollama", ask_ollama), ("anthropic", ask_anthropic), ("openai responses", ask_responses)):
        history = [{"role": "user", "content": QUESTION}]
        answer = ask(args.url, args.api_key, model, history)
        history += [{"role": "assistant", "content": answer}, {"role": "user", "content": FOLLOW_UP}]
        follow_up = ask(args.url, args.api_key, model, history)
        print(f"{name:>16}: {QUESTION} -> {answer!r}\n{'':>16}  {FOLLOW_UP} -> {follow_up!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
