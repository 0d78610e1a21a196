import pytest

from lwqc.ir.errors import PipelineError
from lwqc.passes.base import Option, Pass, PassKind
from lwqc.passes.entropy import EntropyPass
from lwqc.passes.pipeline import format_pass, format_pipeline
from lwqc.passes.policy_entropy import EntropyPolicy
from lwqc.passes.policy_uniform import UniformPolicy
from lwqc.passes.quantize import QuantizePass
from lwqc.passes.zd import ZDPass
from lwqc.registry import REGISTRY, parse


class _EchoPass(Pass):
    """A test-only pass with free-text options, registered per test by the fixture below."""

    name = "echo"
    kind = PassKind.ANALYSIS
    options = {
        "text": Option(str, None, "free text"),
        "tag": Option(str, None, "repeatable free text", multiple=True),
        "n": Option(int, 0, "a number"),
    }

    def run(self, graph, context):
        """Only its options matter here."""


@pytest.fixture(autouse=True)
def _echo_registered(monkeypatch):
    monkeypatch.setitem(REGISTRY, "echo", _EchoPass)


ROUND_TRIP_TEXTS = [
    "zd",
    "zd,entropy,policy-entropy{bits=4.5},quantize",
    " zd , entropy{method=histogram}",
    "zd{block=pooled},policy-zd{ratio=0.25,lo=2,hi=8,granularity=layer}",
    "outliers{factor=2}",
    "policy-random{ratio=0.5,seed=7,group_size=64,scheme=rtn-sym}",
    'policy-uniform{width=8,override="lm_head=4",override="layers\\.0\\..*=16"}',
    r'policy-uniform{width=8,override="lm_head=4",override="layers\\.0\\..*=16"}',
    r'echo{text="dir,with{braces}=and \"quotes\"\\back.json"}',
    'echo{text=" padded ",n=3}',
    "echo{text=plain name.json}",
    r'echo{tag="a,b",tag="{c}",tag="d=e",tag="\"",tag="\\",tag=plain,tag=""}',
    "echo",
    "policy-entropy{bits=3.25,k=1e-3,override=\"mlp=8\"}",
]


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_canonical_text_parses_back_to_equal_passes(text):
    passes = parse(text)
    canonical = format_pipeline(passes)
    assert parse(canonical) == passes


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_canonical_text_is_a_fixed_point(text):
    canonical = format_pipeline(parse(text))
    assert format_pipeline(parse(canonical)) == canonical


def test_parse_builds_configured_passes_in_order():
    passes = parse("zd,entropy,policy-entropy{bits=4.5},quantize")
    assert passes == [ZDPass(), EntropyPass(), EntropyPolicy(bits=4.5), QuantizePass()]
    assert passes[2].values["bits"] == 4.5
    assert passes[2].values["k"] == 0.65
    assert passes[2].values["group_size"] == 128


def test_canonical_text_lists_every_valued_option_in_declared_order():
    text = format_pipeline(parse("zd,entropy,policy-entropy{bits=4.5},quantize"))
    assert text == (
        "zd{block=mean},entropy{method=softmax},"
        "policy-entropy{bits=4.5,group_size=128,scheme=rtn-asym,"
        "solver=greedy,k=0.65},"
        "quantize{clip=minmax}"
    )


def test_canonical_text_reorders_options_and_normalises_floats():
    passes = parse("policy-random{seed=3,lo=2,hi=4,ratio=0.25,granularity=layer}")
    assert format_pipeline(passes) == (
        "policy-random{ratio=0.25,hi=4,lo=2,granularity=layer,group_size=128,"
        "scheme=rtn-asym,solver=greedy,seed=3}"
    )
    assert format_pipeline(parse("outliers{factor=2}")) == "outliers{factor=2.0}"


def test_repeated_override_options_collect_in_order():
    text = r'policy-uniform{width=8,override="lm_head=4",override="layers\\.0\\..*=16"}'
    (policy,) = parse(text)
    assert policy == UniformPolicy(width=8, override=["lm_head=4", r"layers\.0\..*=16"])
    assert policy.values["override"] == ["lm_head=4", r"layers\.0\..*=16"]
    assert format_pass(policy) == (
        "policy-uniform{width=8,group_size=128,scheme=rtn-asym,"
        r'override="lm_head=4",override="layers\\.0\\..*=16"}'
    )


def test_backslash_in_quoted_value_escapes_the_next_character():
    (policy,) = parse(r'policy-uniform{width=8,override="layers\.0\..*=16"}')
    assert policy.values["override"] == ["layers.0..*=16"]


def test_quoted_value_keeps_special_characters():
    (echo,) = parse(r'echo{text="a,b{c}=\"d\"\\e.json"}')
    assert echo.values["text"] == 'a,b{c}="d"\\e.json'
    assert format_pass(echo) == r'echo{text="a,b{c}=\"d\"\\e.json",n=0}'


def test_repeated_free_text_option_keeps_every_value_in_order():
    (echo,) = parse(r'echo{tag="a,b",tag=plain,tag="\\",tag=""}')
    assert echo.values["tag"] == ["a,b", "plain", "\\", ""]
    assert format_pass(echo) == r'echo{tag="a,b",tag=plain,tag="\\",tag="",n=0}'


def test_value_with_outer_spaces_is_quoted_and_bare_values_are_stripped():
    (padded,) = parse('echo{text=" p.json "}')
    assert padded.values["text"] == " p.json "
    assert format_pass(padded) == 'echo{text=" p.json ",n=0}'
    (bare,) = parse("echo{ text = p q.json }")
    assert bare.values["text"] == "p q.json"
    assert format_pass(bare) == "echo{text=p q.json,n=0}"


def test_pass_without_options_has_bare_canonical_name():
    assert format_pipeline(parse("lower-torch")) == "lower-torch"
    assert format_pipeline(parse("lower-torch{}")) == "lower-torch"


def _error(text):
    with pytest.raises(PipelineError) as info:
        parse(text)
    return str(info.value)


def test_unknown_pass_is_rejected_with_known_names():
    message = _error("zd,frobnicate")
    assert "unknown pass 'frobnicate'" in message
    assert "entropy" in message and "policy-zd" in message


def test_unknown_option_is_rejected_with_the_pass_options():
    message = _error("zd{blok=mean}")
    assert "pass 'zd' has no option 'blok'" in message
    assert "block" in message


def test_option_on_pass_without_options_is_rejected():
    message = _error("lower-torch{fast=1}")
    assert "has no option 'fast'" in message
    assert "none" in message


def test_bad_float_value_is_rejected():
    message = _error("policy-zd{bits=abc}")
    assert "policy-zd" in message
    assert "bits='abc'" in message


def test_bad_choice_value_is_rejected_with_allowed_values():
    message = _error("entropy{method=kde}")
    assert "method='kde'" in message
    assert "softmax" in message and "histogram" in message


def test_bad_width_is_rejected():
    assert "lo='5'" in _error("policy-zd{ratio=0.5,lo=5}")


def test_bad_override_is_rejected():
    assert "REGEX=BITS" in _error('policy-zd{bits=4,override="lm_head"}')
    assert "bad regular expression" in _error('policy-zd{bits=4,override="(=4"}')


def test_option_given_twice_is_rejected():
    message = _error("policy-zd{bits=4,bits=5}")
    assert "'bits' given twice" in message


def test_unterminated_quote_is_rejected():
    assert "unterminated quote" in _error('echo{text="abc}')
    assert "unterminated quote" in _error('echo{text="abc\\')


@pytest.mark.parametrize("text", ["zd,,entropy", ",zd", "zd,", ""])
def test_empty_element_is_rejected(text):
    assert "empty pass name" in _error(text)


def test_missing_closing_brace_is_rejected():
    message = _error("policy-zd{bits=4")
    assert "expected '}'" in message
    assert "end of text" in message


def test_missing_equals_is_rejected():
    assert "expected '='" in _error("zd{block}")


def test_text_after_closing_brace_is_rejected():
    assert "expected ','" in _error("policy-zd{bits=4}{")


def test_conflicting_budget_options_are_rejected():
    assert "not both" in _error("policy-zd{bits=4,ratio=0.5}")
    assert "must be below" in _error("policy-zd{bits=4,lo=8,hi=4}")


@pytest.mark.parametrize("text", ["zd{block=mean} ,entropy", "entropy{method=softmax} ",
                                  'policy-zd{bits=4,override="x=8" }'])
def test_spaces_between_elements_are_ignored(text):
    assert parse(text) == parse(text.replace(" ", ""))


def test_spaces_inside_quotes_are_kept():
    (policy,) = parse('policy-zd{bits=4,override="a b=8"}')
    assert policy.values["override"] == ["a b=8"]


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "0"])
def test_non_finite_or_zero_bits_are_rejected(value):
    assert "bits must be a positive number" in _error(f"policy-zd{{bits={value}}}")


def test_lwqc_passes_lists_every_pass_with_its_contract(capsys):
    from lwqc.cli import main
    from lwqc.registry import REGISTRY

    assert main(["passes"]) == 0
    printed = capsys.readouterr().out
    headers = [line.split(" ")[0] for line in printed.splitlines() if not line.startswith(" ")]
    assert headers == sorted(REGISTRY)
    assert "requires site.lim, block.lim; provides plan" in printed
    assert "    group_size: group size along the input dimension (default 128)" in printed
