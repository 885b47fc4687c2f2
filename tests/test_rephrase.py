"""The rephraser: its prompt, its config file, the tolerant answer parser, and calls to a real server.

Why a table for the parser: LLMs drift from the asked-for format in many small ways, and each tolerated
drift is a conversation whose rephrasings are not thrown away.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ftrecipe.dataprep.llm import LLMClient, LLMSettings
from ftrecipe.dataprep.prompt import PromptTemplate
from ftrecipe.dataprep.rephrase import (
    RephraseOutcome,
    RephraserConfig,
    parse_rephrasings,
    read_rephrase_config,
    rephrase_conversation,
    rephrase_prompt,
)
from ftrecipe.dataprep.yamlfile import InputError
from support.llm_server import ChatRequest, LLMServer

MESSAGES = ["I want to send money", "to John", "50 dollars"]
TRANSCRIPT = "USER: I want to send money\nBOT: Who to?\nUSER: to John\nBOT: How much?\nUSER: 50 dollars"

GOOD_ANSWER = """\
USER: I want to send money
1. I'd like to transfer some cash
2. Can I send money?

USER: to John
1. John
2. send it to John

USER: 50 dollars
1. $50
2. fifty bucks
"""
GOOD = [
    ["I'd like to transfer some cash", "Can I send money?"],
    ["John", "send it to John"],
    ["$50", "fifty bucks"],
]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def render_default(messages: list[str], n: int) -> str:
    return rephrase_prompt(
        read_rephrase_config(None),
        test_case_name="transfer_money_happy",
        transcript=TRANSCRIPT,
        user_messages=messages,
        number_of_rephrasings=n,
    )


# -- the prompt ------------------------------------------------------------------------------------


def test_default_template_renders_every_variable() -> None:
    prompt = render_default(MESSAGES, 7)
    assert "transfer_money_happy" in prompt
    assert TRANSCRIPT in prompt
    assert "write 7 different messages" in prompt
    assert "its 7 rephrasings" in prompt
    assert "each of the 3 user messages" in prompt
    for message in MESSAGES:
        assert f"USER: {message}\n" in prompt
    assert "{{" not in prompt and "{%" not in prompt


def test_default_template_answer_example_parses() -> None:
    """Our own example must be in the format our parser reads."""
    prompt = render_default(["I'd like to book a table", "four people"], 2)
    example = prompt.split("with 2 rephrasings each:")[1].split("## The user messages")[0]
    assert parse_rephrasings(example, ["I'd like to book a table", "four people"], 2) == [
        ["Can I reserve a table?", "I want to make a reservation, please"],
        ["there will be 4 of us", "a table for four"],
    ]


def test_user_template_with_rasa_variable_names(tmp_path: Path) -> None:
    write(
        tmp_path / "prompts" / "rephrase.jinja2",
        "Case {{ test_case_name }} ({{ number_of_user_messages }} messages, {{ number_of_rephrasings }} each)\n"
        "{{ transcript }}\n"
        "{% for m in user_messages %}{{ user_prefix }}: {{ m }}\n{% endfor %}",
    )
    config_file = write(tmp_path / "rephrase.yml", "prompt_template: prompts/rephrase.jinja2\n")
    prompt = rephrase_prompt(
        read_rephrase_config(config_file),
        test_case_name="t1",
        transcript="USER: hi",
        user_messages=["hi", "bye"],
        number_of_rephrasings=4,
    )
    assert prompt == "Case t1 (2 messages, 4 each)\nUSER: hi\nUSER: hi\nUSER: bye\n"


# -- the config file -------------------------------------------------------------------------------


def test_config_defaults() -> None:
    config = read_rephrase_config(None)
    assert config.llm is None
    assert config.source == "defaults"
    assert config.template.source == "builtin:rephrase_prompt.jinja2"
    assert "{{ user_prefix }}" in config.template.text


def test_config_relative_template_and_llm(tmp_path: Path) -> None:
    write(tmp_path / "conf" / "my.jinja2", "{{ user_messages | join(', ') }}")
    config_file = write(
        tmp_path / "conf" / "rephrase.yml",
        "prompt_template: my.jinja2\nllm:\n  provider: openai\n  model: gpt-4o-mini\n  temperature: 0.7\n",
    )
    config = read_rephrase_config(config_file)
    assert config.source == str(config_file)
    assert config.template.source == str(tmp_path / "conf" / "my.jinja2")
    assert config.llm == LLMSettings(provider="openai", model="gpt-4o-mini", temperature=0.7)


def test_config_empty_file_means_defaults(tmp_path: Path) -> None:
    config = read_rephrase_config(write(tmp_path / "rephrase.yml", ""))
    assert config.llm is None
    assert config.template == read_rephrase_config(None).template


def test_config_unknown_key(tmp_path: Path) -> None:
    config_file = write(tmp_path / "rephrase.yml", "prompt_template: x.jinja2\ntemperature: 0.5\n")
    with pytest.raises(InputError) as caught:
        read_rephrase_config(config_file)
    message = str(caught.value)
    assert message.startswith(f"{config_file}: ") and "'temperature'" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    "text",
    [
        "llm:\n  model: gpt-4o\n  api_key: sk-SECRET-123\n",
        "api_key: sk-SECRET-123\nllm:\n  model: gpt-4o\n",
    ],
    ids=["in-llm", "top-level"],
)
def test_config_api_key_is_refused_without_echo(tmp_path: Path, text: str) -> None:
    config_file = write(tmp_path / "rephrase.yml", text)
    with pytest.raises(InputError) as caught:
        read_rephrase_config(config_file)
    message = str(caught.value)
    assert str(config_file) in message and "api_key" in message and "OPENAI_API_KEY" in message
    assert "SECRET" not in message and "\n" not in message


def test_config_bad_llm_key_names_file(tmp_path: Path) -> None:
    config_file = write(tmp_path / "rephrase.yml", "llm:\n  model: m\n  secret_thing: hunter2\n")
    with pytest.raises(InputError, match=r"unknown llm key 'secret_thing'") as caught:
        read_rephrase_config(config_file)
    assert str(config_file) in str(caught.value) and "hunter2" not in str(caught.value)


def test_config_unreadable_template(tmp_path: Path) -> None:
    config_file = write(tmp_path / "rephrase.yml", "prompt_template: missing.jinja2\n")
    with pytest.raises(InputError, match=r"cannot read the prompt template") as caught:
        read_rephrase_config(config_file)
    assert str(tmp_path / "missing.jinja2") in str(caught.value)


def test_config_invalid_template_syntax(tmp_path: Path) -> None:
    write(tmp_path / "bad.jinja2", "line one\n{% for m in user_messages %}\n")
    config_file = write(tmp_path / "rephrase.yml", "prompt_template: bad.jinja2\n")
    with pytest.raises(InputError, match=r"bad\.jinja2:\d+: invalid Jinja2 template"):
        read_rephrase_config(config_file)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("- prompt_template: x\n", "expected a mapping"),
        ("prompt_template: 3\n", "prompt_template must be a file path"),
        ("llm: gpt-4o\n", "`llm` must be a mapping"),
    ],
)
def test_config_wrong_shapes(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(InputError, match=expected):
        read_rephrase_config(write(tmp_path / "rephrase.yml", text))


# -- parsing answers -------------------------------------------------------------------------------

PAIR = ["I want to send money", "to John"]

PARSE_CASES: list[tuple[str, str, list[str], int, list[list[str]] | None]] = [
    ("canonical", GOOD_ANSWER, MESSAGES, 5, GOOD),
    (
        "numbering styles and bullets",
        "USER: to John\n1) John\n(2) send it to John\n- to Johnny\n* John please\n• that's John\n3.for John",
        ["to John"],
        10,
        [["John", "send it to John", "to Johnny", "John please", "that's John", "for John"]],
    ),
    (
        "stray whitespace",
        "   USER:    I  want to   send money   \n   1.    move some money   \n\n\n  USER: to John \n 1.  John  \n",
        PAIR,
        5,
        [["move some money"], ["John"]],
    ),
    (
        "no blank line before the next USER",
        "USER: I want to send money\n1. pay someone\nUSER: to John\n1. John",
        PAIR,
        5,
        [["pay someone"], ["John"]],
    ),
    (
        "markdown around USER",
        "**USER:** I want to send money\n1. pay someone\n\n**USER**: to John\n1. John\n\n`USER:` 50 dollars\n1. $50",
        MESSAGES,
        5,
        [["pay someone"], ["John"], ["$50"]],
    ),
    (
        "CRLF line ends",
        "USER: I want to send money\r\n1. pay someone\r\n\r\nUSER: to John\r\n1. John\r\n",
        PAIR,
        5,
        [["pay someone"], ["John"]],
    ),
    (
        "preamble and closing remark",
        "Sure! Here are the rephrasings:\n\nUSER: to John\n1. John\n2. him, John\n\nHope this helps!",
        ["to John"],
        5,
        [["John", "him, John"]],
    ),
    (
        "quotes around rephrasings",
        "USER: to John\n1. \"John\"\n2. “send it to John”\n3. 'Johnny'\n4. **to J.**",
        ["to John"],
        5,
        [["John", "send it to John", "Johnny", "to J."]],
    ),
    (
        "header differs in case, spacing, trailing period and quotes",
        'USER: "i WANT to  send money."\n1. pay someone\n\nuser: To John.\n1. John',
        PAIR,
        5,
        [["pay someone"], ["John"]],
    ),
    (
        "blocks out of order",
        "USER: 50 dollars\n1. $50\n\nUSER: to John\n1. John\n\nUSER: I want to send money\n1. pay someone",
        MESSAGES,
        5,
        [["pay someone"], ["John"], ["$50"]],
    ),
    (
        "duplicates dropped case-insensitively",
        "USER: to John\n1. John\n2. john\n3. JOHN.\n4. to Johnny",
        ["to John"],
        5,
        [["John", "to Johnny"]],
    ),
    (
        "the original is not a rephrasing",
        "USER: to John\n1. to John\n2. To  john.\n3. John",
        ["to John"],
        5,
        [["John"]],
    ),
    (
        "capped at N",
        "USER: to John\n1. a\n2. b\n3. c\n4. d\n5. e",
        ["to John"],
        3,
        [["a", "b", "c"]],
    ),
    (
        "repeated messages take blocks in order",
        "USER: yes\n1. sure\n2. yep\n\nUSER: to John\n1. John\n\nUSER: yes\n1. correct\n2. that's right",
        ["yes", "to John", "yes"],
        5,
        [["sure", "yep"], ["John"], ["correct", "that's right"]],
    ),
    (
        "a repeated message with one block shares it",
        "USER: yes\n1. sure\n\nUSER: to John\n1. John",
        ["yes", "to John", "yes"],
        5,
        [["sure"], ["John"], ["sure"]],
    ),
    (
        "exact match wins over the loose one",
        "USER: yes.\n1. indeed.\n\nUSER: yes\n1. yep",
        ["yes", "yes."],
        5,
        [["yep"], ["indeed."]],
    ),
    (
        "unnumbered lines up to the first blank line",
        "USER: to John\nJohn\nsend it to John\n\nThat's all.",
        ["to John"],
        5,
        [["John", "send it to John"]],
    ),
    (
        "comments inside a numbered block are ignored",
        "USER: to John\nRephrasings:\n1. John\n---\n2. send it to John",
        ["to John"],
        5,
        [["John", "send it to John"]],
    ),
    (
        "numbers inside a rephrasing are not list markers",
        "USER: 50 dollars\n1. 10.5 dollars more than 39.5\n2. 50 bucks",
        ["50 dollars"],
        5,
        [["10.5 dollars more than 39.5", "50 bucks"]],
    ),
    (
        "an echoed transcript before the real blocks",
        "USER: to John\nBOT: How much?\n\nUSER: to John\n1. John",
        ["to John"],
        5,
        [["John"]],
    ),
    (
        "rephrasings that repeat the USER prefix",
        "USER: to John\n1. USER: John\n2. **USER:** to Johnny",
        ["to John"],
        5,
        [["John", "to Johnny"]],
    ),
    (
        "a numbered or headed USER line",
        "### USER 1: I want to send money\n1. pay someone\n\nUSER 2: to John\n1. John",
        PAIR,
        5,
        [["pay someone"], ["John"]],
    ),
    (
        "a block without rephrasings",
        "USER: to John\n\nUSER: yes\n1. sure",
        ["to John", "yes"],
        5,
        [[], ["sure"]],
    ),
    ("N=0 keeps nothing", "USER: to John\n1. John", ["to John"], 0, [[]]),
    ("a message without a block", "USER: I want to send money\n1. pay someone", PAIR, 5, None),
    ("no block at all", "I cannot help with that.", PAIR, 5, None),
    ("empty answer", "", ["hi"], 5, None),
    ("blocks for other messages only", "USER: hello\n1. hi", ["bye"], 5, None),
    ("no messages", "anything", [], 5, None),
]


@pytest.mark.parametrize(
    ("answer", "messages", "n", "expected"),
    [case[1:] for case in PARSE_CASES],
    ids=[case[0] for case in PARSE_CASES],
)
def test_parse_rephrasings(
    answer: str, messages: list[str], n: int, expected: list[list[str]] | None
) -> None:
    assert parse_rephrasings(answer, messages, n) == expected


# -- calls against a real server -------------------------------------------------------------------


@pytest.fixture
def client(llm_server: LLMServer, monkeypatch: pytest.MonkeyPatch) -> LLMClient:
    assert llm_server.api_key is not None
    monkeypatch.setenv("OPENAI_API_KEY", llm_server.api_key)
    settings = LLMSettings(provider="self-hosted", model="m", api_base=llm_server.base_url)
    return LLMClient(settings, backoff_base=0.001)


CONFIG = read_rephrase_config(None)


async def rephrase(client: LLMClient, n: int, messages: list[str] = MESSAGES) -> RephraseOutcome:
    async with client:
        return await rephrase_conversation(
            client,
            CONFIG,
            test_case_name="transfer_money_happy",
            transcript=TRANSCRIPT,
            user_messages=messages,
            number_of_rephrasings=n,
        )


async def test_scripted_answer_becomes_candidates(llm_server: LLMServer, client: LLMClient) -> None:
    @llm_server.script
    def answer(request: ChatRequest) -> str:
        assert "USER: to John\n" in request.prompt
        return GOOD_ANSWER

    outcome = await rephrase(client, 2)
    assert outcome.candidates == GOOD and outcome.warning is None
    assert outcome.raw_answer == GOOD_ANSWER
    (request,) = llm_server.chat_requests
    assert request.messages == [{"role": "user", "content": outcome.prompt}]
    assert client.usage["rephrase"].calls == 1


async def test_garbage_answer_gives_a_warning(llm_server: LLMServer, client: LLMClient) -> None:
    llm_server.answer_with("Sorry, I can't do that.")
    outcome = await rephrase(client, 3)
    assert outcome.candidates is None
    assert outcome.raw_answer == "Sorry, I can't do that."
    warning = outcome.warning
    assert warning is not None
    assert warning.startswith("transfer_money_happy: ") and "no `USER:` block" in warning


async def test_failing_llm_gives_a_warning(llm_server: LLMServer, client: LLMClient) -> None:
    llm_server.fail_next(10, status=503, retry_after=0.001)
    outcome = await rephrase(client, 3)
    assert outcome.candidates is None and outcome.raw_answer is None
    warning = outcome.warning
    assert warning is not None
    assert warning.startswith("transfer_money_happy: ") and "HTTP 503" in warning and "\n" not in warning
    assert len(llm_server.requests) == client.max_attempts


@pytest.mark.parametrize(("n", "messages"), [(0, MESSAGES), (3, [])], ids=["n=0", "no-messages"])
async def test_nothing_to_ask_makes_no_request(
    llm_server: LLMServer, client: LLMClient, n: int, messages: list[str]
) -> None:
    outcome = await rephrase(client, n, messages)
    assert outcome.candidates == [[] for _ in messages] and outcome.warning is None
    assert llm_server.requests == []


def test_config_is_frozen() -> None:
    config = RephraserConfig(template=PromptTemplate("x", "y"), llm=None, source="defaults")
    with pytest.raises(AttributeError):
        config.source = "z"  # type: ignore[misc]
