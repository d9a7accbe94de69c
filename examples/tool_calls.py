"""A tool-calling round trip and a JSON-schema answer, through the openai client, against a running pdcluster.

1. Offer two functions with ``tool_choice="required"``: the answer is a call
   (constrained decoding makes it one, in the model's own format), whose
   arguments validate against the function's schema.
2. Run the "function" locally and send its result back: the model answers.
3. Ask for a ``json_schema`` answer and print it, parsed.

Works with any model whose chat template has tools (hermes, llama3 or mistral
format; docs/api.md, "Tools"), including the random-weight tiny models from
``pdc make-model``, whose free text is noise but whose constrained answers
still validate:

    pdc make-model /tmp/tiny && pdc up --model /tmp/tiny &
    python examples/tool_calls.py --url http://127.0.0.1:8000 [--api-key KEY]
"""
from __future__ import annotations

import argparse
import json

WEATHER = {"type": "object", "additionalProperties": False, "required": ["city"],
           "properties": {"city": {"type": "string", "maxLength": 24},
                          "unit": {"enum": ["celsius", "fahrenheit"]}}}
CLOCK = {"type": "object", "additionalProperties": False, "required": ["zone"],
         "properties": {"zone": {"enum": ["UTC", "Europe/Paris", "Asia/Tokyo"]}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "description": "Current time in a zone",
                                           "parameters": CLOCK}}]
ANSWER = {"type": "object", "additionalProperties": False, "required": ["city", "sunny"],
          "properties": {"city": {"type": "string", "maxLength": 24}, "sunny": {"type": "boolean"}}}


def run_tool(name: str, arguments: dict) -> str:
    """The stand-in for real functions: a fixed, plausible result."""
    if name == "get_weather":
        return json.dumps({"city": arguments.get("city"), "temperature": 21, "sky": "sunny"})
    return json.dumps({"zone": arguments.get("zone"), "time": "12:00"})


def main() -> None:
    import openai

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the scheduler (default: %(default)s)")
    parser.add_argument("--api-key", default=None, help="the scheduler's --api-key, if it has one")
    parser.add_argument("--model", default=None, help="model id (default: the first served)")
    args = parser.parse_args()
    client = openai.OpenAI(base_url=args.url + "/v1", api_key=args.api_key or "unused", timeout=300, max_retries=0)
    model = args.model or client.models.list().data[0].id
    messages = [{"role": "user", "content": "What is the weather like in Paris right now?"}]

    reply = client.chat.completions.create(model=model, messages=messages, tools=TOOLS, tool_choice="required",
                                           parallel_tool_calls=False, max_tokens=200, temperature=0)
    call = reply.choices[0].message.tool_calls[0]
    arguments = json.loads(call.function.arguments)
    print(f"1. call      {call.function.name}({json.dumps(arguments)})   finish_reason={reply.choices[0].finish_reason}")

    result = run_tool(call.function.name, arguments)
    messages += [{"role": "assistant", "content": None, "tool_calls": [call.model_dump(exclude_none=True)]},
                 {"role": "tool", "tool_call_id": call.id, "content": result}]
    answer = client.chat.completions.create(model=model, messages=messages, tools=TOOLS, max_tokens=48, temperature=0)
    print(f"2. result    {result}\n   answer    {answer.choices[0].message.content!r}")

    shaped = client.chat.completions.create(
        model=model, max_tokens=120, temperature=0,
        messages=[{"role": "user", "content": "Is it sunny in Paris? Answer in JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": ANSWER}})
    print(f"3. json      {json.loads(shaped.choices[0].message.content)}")


if __name__ == "__main__":
    main()
