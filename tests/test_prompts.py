"""prompts.py: golden prompts for a real example of every dataset, the parsers on tricky outputs, and
the importer of the paper's released rationales on every row."""
import re

import pytest

import data
import prompts
from data import Example


@pytest.fixture(scope="module")
def release_data(tmp_path_factory):
    """The six datasets and their rationale files, fetched from the release copy as a folder source."""
    from conftest import assets_dir, download
    if assets_dir() is None:
        pytest.skip("real assets not found: set TINYLLM_ASSETS to run this test")
    folder = tmp_path_factory.mktemp("data")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TINYLLM_DATA_URL", str(assets_dir() / "tinyllm_release"))
        for dataset in data.DATASETS:
            download(dataset, folder, rationales=True)
    return folder


def example_by_id(release_data, dataset: str, split: str, ident: str) -> Example:
    return next(e for e in data.load_split(dataset, split, release_data) if e.id == ident)


# ----------------------------------------------------------------------------- golden prompts

# (dataset, test example id) -> (student input with p_A, teacher-forcing prompt with k = 0)
GOLDEN = {
    ("obqa", "8-343"): (
        "predict: A person wants to start saving money so that they can afford a nice vacation at the end of the "
        "year. After looking over their budget and expenses, they decide the best way to save money is to\n"
        "Answer Choices:\n(a) make more phone calls\n(b) quit eating lunch out\n(c) buy less with monopoly money\n"
        "(d) have lunch with friends",
        "Question: A person wants to start saving money so that they can afford a nice vacation at the end of the "
        "year. After looking over their budget and expenses, they decide the best way to save money is to\n"
        "Options:\n(a) make more phone calls\n(b) quit eating lunch out\n(c) buy less with monopoly money\n"
        "(d) have lunch with friends\nAnswer: (b) quit eating lunch out\nRationale: Let's think step by step."),
    ("arc", "Mercury_7175875"): (
        "predict: An astronomer observes that a planet rotates faster after a meteorite impact. Which is the most "
        "likely effect of this increase in rotation?\nAnswer Choices:\n(a) Planetary density will decrease.\n"
        "(b) Planetary years will become longer.\n(c) Planetary days will become shorter.\n"
        "(d) Planetary gravity will become stronger.",
        "Question: An astronomer observes that a planet rotates faster after a meteorite impact. Which is the most "
        "likely effect of this increase in rotation?\nOptions:\n(a) Planetary density will decrease.\n"
        "(b) Planetary years will become longer.\n(c) Planetary days will become shorter.\n"
        "(d) Planetary gravity will become stronger.\nAnswer: (c) Planetary days will become shorter.\n"
        "Rationale: Let's think step by step."),
    ("piqa", "905"): (  # the options' trailing spaces are the release's own
        "predict: fist\nAnswer Choices:\n(a) grips house \n(b) grips spoon ",
        "Question: fist\nOptions:\n(a) grips house \n(b) grips spoon \nAnswer: (b) grips spoon \n"
        "Rationale: Let's think step by step."),
    ("riddle", "xzc81234ioioucv-887"): (
        "predict: You might accuse someone living with a stolen identity of being this\nAnswer Choices:\n(a) head\n"
        "(b) imposter\n(c) animal\n(d) personality\n(e) schizophrenia",
        "Question: You might accuse someone living with a stolen identity of being this\nOptions:\n(a) head\n"
        "(b) imposter\n(c) animal\n(d) personality\n(e) schizophrenia\nAnswer: (b) imposter\n"
        "Rationale: Let's think step by step."),
    ("pubmedqa", "11296674"): (
        "predict: To report an uncommon association of prostate and lung cancer. \n The characteristics of both "
        "tumors, their association with tumors in other sites and the time of presentation are analyzed. \n Both "
        "tumors were in the advanced stages. Metastatic carcinoma of the prostate was discarded due to the form of "
        "presentation. \n Prostatic syndrome and pleural effusion: are they different diseases?\nAnswer Choices:\n"
        "(a) yes\n(b) no\n(c) maybe",
        "Question: To report an uncommon association of prostate and lung cancer. \n The characteristics of both "
        "tumors, their association with tumors in other sites and the time of presentation are analyzed. \n Both "
        "tumors were in the advanced stages. Metastatic carcinoma of the prostate was discarded due to the form of "
        "presentation. \n Prostatic syndrome and pleural effusion: are they different diseases?\nOptions:\n"
        "(a) yes\n(b) no\n(c) maybe\nAnswer: (c) maybe\nRationale: Let's think step by step."),
    ("bioasq", "6278d0a756bf9aee6f00000e"): (
        "predict: homodimerized p85α \n p110α-free p85α homodimerizes \n homodimeric but not monomeric p85α \n "
        "Does p85α homodimerize?\nAnswer Choices:\n(a) yes\n(b) no",
        "Question: homodimerized p85α \n p110α-free p85α homodimerizes \n homodimeric but not monomeric p85α \n "
        "Does p85α homodimerize?\nOptions:\n(a) yes\n(b) no\nAnswer: (a) yes\nRationale: Let's think step by step."),
}


@pytest.mark.parametrize("dataset,ident", list(GOLDEN))
def test_prompts_for_a_real_example_of_each_dataset(release_data, dataset, ident):
    example = example_by_id(release_data, dataset, "test", ident)
    student, teacher = GOLDEN[dataset, ident]
    assert prompts.student_input(example, prompts.ANSWER_PREFIX) == student
    assert prompts.teacher_prompt(example, []) == teacher
    assert prompts.answer_target(example) == example.options[example.answer]


FOG_CONTEXT = (
    "Question: When certain things are shoved together enough, the earth will tremble and shake because of these\n"
    "Options:\n(a) trail and error\n(b) water road\n(c) dirt collisions\n(d) wet trail\nAnswer: (c) dirt collisions\n"
    "\n"
    "Question: When it's summer in the USA it's winter\nOptions:\n(a) in the southern hemisphere\n"
    "(b) in the northern hemisphere\n(c) in the western hemisphere\n(d) in the eastern hemisphere\n"
    "Answer: (a) in the southern hemisphere\n"
    "\n")


def test_options_are_lettered_a_to_z_and_no_further():
    """Up to 26 options get a letter each, in order; a 27th has none, which is an error, not a wrong letter."""
    options = [f"option {i}" for i in range(26)]
    lines = prompts.format_options(options).splitlines()
    assert lines[0] == "(a) option 0" and lines[-1] == "(z) option 25" and len(lines) == 26
    with pytest.raises(ValueError, match=r"^27 options: at most 26 can be lettered$"):
        prompts.format_options(options + ["one more"])


def test_teacher_forcing_prompt_with_in_context_examples_and_its_ablation(release_data):
    example = example_by_id(release_data, "obqa", "test", "1129")
    context = data.in_context_examples(example, data.load_split("obqa", "train", release_data), k=2, seed=0)
    question = ("Question: There is most likely going to be fog around:\n"
                "Options:\n(a) a marsh\n(b) a tundra\n(c) the plains\n(d) a desert\n")
    forced = prompts.teacher_prompt(example, context)
    assert forced == FOG_CONTEXT + question + "Answer: (a) a marsh\nRationale: Let's think step by step."
    plain = prompts.teacher_prompt(example, context, teacher_forcing=False)
    assert plain == FOG_CONTEXT + question + "Rationale: Let's think step by step."
    assert prompts.prompt_sha256(forced) != prompts.prompt_sha256(plain)
    assert prompts.prompt_sha256("") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def test_prefixes():
    assert prompts.ANSWER_PREFIX == "predict: "
    assert prompts.teacher_prefix("flan-t5-xl") == "explain: "  # the official tiny.py's prefixes
    assert prompts.teacher_prefix("llama-2") == "rationale: "
    assert prompts.teacher_prefix("qwen2.5-7b") == "explain qwen2.5-7b: "
    assert prompts.teacher_prefix("flan-t5-xl", prefixes={}) == "explain flan-t5-xl: "
    assert prompts.teacher_prefix("gpt", prefixes={"gpt": "gpt says: "}) == "gpt says: "
    with pytest.raises(ValueError):
        prompts.teacher_prefix(" ")
    example = Example("x", "Why?", ("because", "why not"), 0)
    assert prompts.student_input(example, prompts.teacher_prefix("llama-2")) == \
        "rationale: Why?\nAnswer Choices:\n(a) because\n(b) why not"


# ----------------------------------------------------------------------------- parsing answers

OBQA = ("a marsh", "a tundra", "the plains", "a desert")
PARSE_ANSWER = [
    ("a marsh", OBQA, 0),
    ("  A Marsh. ", OBQA, 0),  # case, whitespace, trailing punctuation
    ('"the plains"', OBQA, 2),
    ("(b)", OBQA, 1),
    ("b)", OBQA, 1),
    ("B", OBQA, 1),
    ("d.", OBQA, 3),
    ("Answer: C", OBQA, 2),
    ("The answer is (d)", OBQA, 3),
    ("(b) a tundra", OBQA, 1),
    ("(b) a marsh", OBQA, None),  # letter and text disagree
    ("(e)", OBQA, None),  # no such option
    ("a", OBQA, 0),  # a lone letter, even "a"
    ("it is a desert, surely", OBQA, 3),  # unique containment
    ("a marsh or a desert", OBQA, None),  # two contained: ambiguous
    ("plains", OBQA, 2),  # a truncated answer inside exactly one option
    ("a", ("a", "b"), 0),  # options that look like letters match as text first
    ("b", ("b", "a"), 0),
    ("", OBQA, None),
    ("I don't know", OBQA, None),
    ("lung cell", ("bacterial cell", "lung cell", "cell", "tail cell"), 1),  # exact beats containment
    ("the lung cell does", ("bacterial cell", "lung cell", "cell wall", "tail cell"), 1),
    ("yes", ("yes", "no", "maybe"), 0),
    ("Maybe.", ("yes", "no", "maybe"), 2),
    ("nope", ("yes", "no", "maybe"), None),  # "no" only as part of a word
    ("grips spoon", ("grips house ", "grips spoon "), 1),  # PIQA's trailing spaces
    ("Planetary days will become shorter", ("Planetary density will decrease.",
                                            "Planetary days will become shorter."), 1),
]


@pytest.mark.parametrize("text,options,expected", PARSE_ANSWER)
def test_parse_answer(text, options, expected):
    assert prompts.parse_answer(text, options) == expected


YES_NO = ("yes", "no", "maybe")
STATED = [
    ("Eating lunch out costs money. Thus, the answer is (b) quit eating lunch out",
     ("make more phone calls", "quit eating lunch out", "buy less", "have lunch"), 1),
    ("Marshes are wet. Thus, the answer is (a) a marsh\n\nQ: There is most likely", OBQA, 0),
    ("So the answer is b.", OBQA, 1),
    ("The answer is \"b\" because \"the plains\" are dry.", OBQA, 1),
    ("The correct answer is \"a desert\".\nLet's look at the options.", OBQA, 3),
    ("the answer is a marsh", OBQA, 0),  # "a" is the article here, the text decides
    ("Therefore, the answer is (a) yes.\n\nExplanation: the answer is not certain", YES_NO, 0),
    ("Answer: (c)", YES_NO, 2),
    ("First the answer is (a). On reflection, the answer is (b) no.", YES_NO, 1),  # the last statement
    ("Option (a) is incorrect. Option (b) is incorrect.", OBQA, None),  # no statement of an answer
    ("Fog forms over wet ground.", OBQA, None),
    ("The answer is (f) none of these", OBQA, None),
    ("The answer isn't (a) a marsh.", OBQA, None),
]


@pytest.mark.parametrize("rationale,options,expected", STATED)
def test_stated_answer(rationale, options, expected):
    assert prompts.stated_answer(rationale, options) == expected


# ----------------------------------------------------------------------------- cleaning rationales

CLEAN = [
    ("Let's think step by step. Marshes are wet.\nWet places are foggy.", "", "Marshes are wet. Wet places are foggy."),
    ("let’s think step by step\nFog needs water.", "", "Fog needs water."),
    ("Rationale: Let's think step by step. Fog needs water.", "", "Fog needs water."),
    ("PROMPT\nRationale: Let's think step by step. Fog needs water.", "PROMPT\nRationale: Let's think step by step.",
     "Fog needs water."),
    ("Fog needs water.\nQuestion:\nIf you have a good grasp of English", "", "Fog needs water."),
    ("Fog needs water. Thus, the answer is (a) a marsh\n\nQ: There is most likely", "",
     "Fog needs water. Thus, the answer is (a) a marsh"),
    ("Fog needs water. Q: What is next?", "", "Fog needs water."),
    ("The FAQ: fog needs water.", "", "The FAQ: fog needs water."),  # not a new question
    ("Fog needs water. ### Question: Which is wet?", "", "Fog needs water."),  # LLaMA-2's markdown next question
    ("Fog needs water. ### QUESTION 11", "", "Fog needs water."),
    ("Fog needs water.\n\n### Q2\nQuestion:\nWhich", "", "Fog needs water."),
    ("Fog needs water. ### 10. The moon", "", "Fog needs water."),
    ("Fog needs water.\n###\n###\n###", "", "Fog needs water."),
    ("Fog needs water. ### Explanation: marshes are wet.", "", "Fog needs water. ### Explanation: marshes are wet."),
    ("  \n ", "", ""),
]


@pytest.mark.parametrize("raw,prompt,expected", CLEAN)
def test_clean_rationale(raw, prompt, expected):
    assert prompts.clean_rationale(raw, prompt) == expected


DEGENERATE = [
    ("", True),
    ("A calf", True),
    ("Guinea pigs need a lot of bedding. Guinea pigs need a lot of bedding.", True),
    ("The next letter is P. The next letter is C. The next letter is T. The next letter is R. "
     "The next letter is Y. The next letter is E. The next letter is T. The next letter is E.", True),
    ("Let's think step by step. " * 10, True),
    ("Eating lunch out costs money. People spend money on lunch out. Quitting saves that money.", False),
    ("Marshes are wet places. Wet places are prone to fog.", False),
]


@pytest.mark.parametrize("text,expected", DEGENERATE)
def test_is_degenerate(text, expected):
    assert prompts.is_degenerate(text) == expected


# ----------------------------------------------------------------------------- the release importer

def official_split(raw: str) -> tuple[str, str]:
    """An independent restatement of the official data_utils.py parsing, as the reference."""
    head = raw.split("Q:")[0].rstrip()
    flan = head.split("Thus, the answer is")[0].rstrip()
    at = raw.find("llama rationale: ")
    return flan, raw[at + len("llama rationale: "):].strip() if at != -1 else ""


@pytest.mark.parametrize("dataset", data.DATASETS)
def test_release_rationales_recovered_for_every_row(release_data, dataset):
    llama_found = 0
    for split in data.SPLITS:
        examples = data.load_split(dataset, split, release_data)
        raws = data.load_release_rationales(dataset, split, release_data)
        for example, raw in zip(examples, raws, strict=True):
            flan, llama = prompts.parse_release(raw, example)
            reference_flan, reference_llama = official_split(raw)
            assert flan == reference_flan
            assert "Thus, the answer is" not in flan and "\nQ: " not in flan
            if llama is not None:
                assert llama == reference_llama and llama
                llama_found += 1
            # with teacher forcing, FLAN-T5's stated answer is the gold one in every row of the release
            assert prompts.stated_answer(raw.split("\n\nQ: ")[0], example.options) == example.answer
    if dataset == "piqa":
        assert llama_found == 0  # the release has no LLaMA-2 rationale for PIQA: reported as None
    else:
        assert llama_found == sum(len(data.load_split(dataset, s, release_data)) for s in data.SPLITS)


def test_release_rationale_of_another_question_is_rejected(release_data):
    examples = data.load_split("riddle", "valid", release_data)
    raws = data.load_release_rationales("riddle", "valid", release_data)
    flan, llama = prompts.parse_release(raws[0], examples[0])
    with pytest.raises(ValueError, match=rf"example {examples[1].id!r} is about another question"):
        prompts.parse_release(raws[0], examples[1])
    with pytest.raises(ValueError, match="no embedded 'Q: ...\\\\nAnswer Choices:' block"):
        prompts.parse_release("just a rationale llama rationale: another", examples[0])


def test_parse_release_on_the_readme_example():
    raw = ("Welding is the process of joining metals together. Thus, the answer is (a) Weld the metal\n\n"
           "Q: To permanently attach metal legs to a chair, you can\nAnswer Choices:\n(a) Weld the metal\n"
           "(b) Nail the metal llama rationale: Let's think step by step.\nFirst, weld.\n")
    example = Example("1", "To permanently attach metal legs to a chair, you can", ("Weld the metal", "Nail the metal"), 0)
    assert prompts.parse_release(raw, example) == ("Welding is the process of joining metals together.",
                                                   "Let's think step by step.\nFirst, weld.")
    without_llama = raw.split(" llama rationale: ")[0]
    assert prompts.parse_release(without_llama, example) == ("Welding is the process of joining metals together.", None)


# real LLaMA-2 release rationales that go on with the next question, and where the rationale ends
NEXT_QUESTION = [("obqa", "9-938", "so granite cannot get smaller."),
                 ("arc", "Mercury_7239523", "are the ones that sense the movement of the muscles."),
                 ("arc", "Mercury_7108973", "Jupiter is the largest planet in our solar system.")]


@pytest.mark.parametrize("dataset,ident,ending", NEXT_QUESTION)
def test_release_rationale_is_cut_before_the_next_question(release_data, dataset, ident, ending):
    examples = data.load_split(dataset, "train", release_data)
    raws = data.load_release_rationales(dataset, "train", release_data)
    raw = next(r for e, r in zip(examples, raws) if e.id == ident)
    llama = prompts.parse_release(raw, example_by_id(release_data, dataset, "train", ident))[1]
    assert "###" in llama  # the release line itself goes on with "### Question ...", "### 34."
    assert prompts.clean_rationale(llama).endswith(ending)


@pytest.mark.parametrize("dataset", ["obqa", "arc"])
def test_no_release_rationale_keeps_a_next_question(release_data, dataset):
    """On every train row: no cleaned LLaMA-2 rationale keeps a "### Question" / "### Q<n>" / "### <n>." heading
    (297 of OBQA's 4,957 raw ones do, 54 of ARC's 1,117), and the headings that explain ("### Explanation")
    are kept, not cut."""
    examples = data.load_split(dataset, "train", release_data)
    raws = data.load_release_rationales(dataset, "train", release_data)
    cleaned = [prompts.clean_rationale(prompts.parse_release(r, e)[1]) for e, r in zip(examples, raws)]
    raw_next = sum("### Question" in prompts.parse_release(r, e)[1] for e, r in zip(examples, raws))
    assert raw_next >= 0.01 * len(examples)  # OBQA 123 of 4,957, ARC 28 of 1,117
    assert not any(re.search(r"###\s*(?:Questions?|QUESTIONS?|Q\b|Q?\.?\s*\d)", text) for text in cleaned)
    assert any("### Explanation" in text for text in cleaned)
