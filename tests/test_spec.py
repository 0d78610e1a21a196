"""QuantSpec: JSON form, construction and validation, and backend capability checks."""

import dataclasses
import json

import pytest

from lwqc.ir.capabilities import PACKED_STORAGE, Capabilities
from lwqc.ir.errors import PlanError
from lwqc.ir.spec import (
    SCHEMES,
    SPECS,
    WIDTHS,
    AsymmetricSpec,
    CodebookSpec,
    FloatOffsetDqSpec,
    FloatOffsetSpec,
    KeepSpec,
    RowMixSpec,
    SymmetricSpec,
    make_spec,
    spec_from_json,
)

EVERY_SPEC = [
    KeepSpec(),
    AsymmetricSpec(bits=4, group_size=128),
    AsymmetricSpec(bits=2, group_size=None, outliers=0.01),
    SymmetricSpec(bits=8, group_size=32),
    SymmetricSpec(bits=3, group_size=None, outliers=0.25),
    FloatOffsetSpec(bits=4, group_size=32),
    FloatOffsetSpec(bits=3, group_size=None, outliers=0.005),
    FloatOffsetDqSpec(bits=4, group_size=32),
    FloatOffsetDqSpec(bits=2, group_size=16, outliers=0.01),
    CodebookSpec(bits=2),
    CodebookSpec(bits=4, outliers=0.1),
    RowMixSpec(bits=4, parts=(FloatOffsetDqSpec(3, 128), AsymmetricSpec(4, 32, 0.01)),
               rows="0110"),
]


def test_schemes_and_widths_are_the_documented_lists():
    assert SCHEMES == ("rtn-asym", "rtn-sym", "float-offset", "float-offset-dq", "codebook")
    assert set(SPECS) == {"keep", "row-mix", *SCHEMES}
    assert WIDTHS == (2, 3, 4, 8, 16)


@pytest.mark.parametrize("spec", EVERY_SPEC, ids=lambda s: s.label())
def test_every_spec_round_trips_through_json_text(spec):
    back = spec_from_json(json.loads(json.dumps(spec.to_json())))
    assert type(back) is type(spec)
    assert back == spec


def test_every_scheme_is_covered_by_the_round_trip_cases():
    assert {s.scheme for s in EVERY_SPEC} == set(SPECS)


@pytest.mark.parametrize("spec, expected", [
    (AsymmetricSpec(4, 128), {"bits": 4, "group_size": 128, "scheme": "rtn-asym"}),
    (AsymmetricSpec(2, None), {"bits": 2, "group_size": None, "scheme": "rtn-asym"}),
    (SymmetricSpec(8, 32), {"bits": 8, "group_size": 32, "scheme": "rtn-sym"}),
    (KeepSpec(), {"bits": 16, "group_size": None, "scheme": "keep"}),
])
def test_rtn_and_keep_json_is_exactly_bits_group_size_scheme_in_order(spec, expected):
    data = spec.to_json()
    assert data == expected
    assert list(data) == ["bits", "group_size", "scheme"]
    assert json.dumps(data) == json.dumps(expected)  # plan.json text is unchanged


def test_float_offset_and_codebook_json_without_outliers():
    assert FloatOffsetSpec(3, 64).to_json() == {"bits": 3, "group_size": 64,
                                                "scheme": "float-offset"}
    assert CodebookSpec(4).to_json() == {"bits": 4, "scheme": "codebook"}
    assert list(CodebookSpec(4).to_json()) == ["bits", "scheme"]


@pytest.mark.parametrize("spec, expected", [
    (AsymmetricSpec(4, 128, 0.01),
     {"bits": 4, "group_size": 128, "outliers": 0.01, "scheme": "rtn-asym"}),
    (SymmetricSpec(3, None, 0.2),
     {"bits": 3, "group_size": None, "outliers": 0.2, "scheme": "rtn-sym"}),
    (FloatOffsetSpec(2, 16, 0.05),
     {"bits": 2, "group_size": 16, "outliers": 0.05, "scheme": "float-offset"}),
    (CodebookSpec(8, 0.001), {"bits": 8, "outliers": 0.001, "scheme": "codebook"}),
])
def test_outliers_appear_in_json_only_when_non_zero(spec, expected):
    assert spec.to_json() == expected
    assert list(spec.to_json()) == list(expected)


@pytest.mark.parametrize("cls", [AsymmetricSpec, SymmetricSpec, FloatOffsetSpec])
def test_explicit_zero_outliers_are_left_out_of_json(cls):
    assert "outliers" not in cls(4, 32, 0.0).to_json()
    assert "outliers" not in cls(4, 32, 0).to_json()
    assert "outliers" not in CodebookSpec(4, 0).to_json()


def test_spec_from_json_reads_absent_outliers_as_none():
    assert spec_from_json({"bits": 4, "group_size": 64, "scheme": "rtn-asym"}).outliers == 0.0
    assert spec_from_json({"bits": 2, "scheme": "codebook"}).outliers == 0.0


def test_spec_from_json_ignores_unknown_and_foreign_fields():
    data = {"bits": 4, "group_size": 32, "scheme": "codebook", "role": "q", "bytes": 9}
    assert spec_from_json(data) == CodebookSpec(4)
    data = {"bits": 16, "group_size": 8, "scheme": "rtn-asym", "outliers": 0.1}
    assert spec_from_json(data) == KeepSpec()


def test_labels_name_width_group_scheme_and_outliers():
    assert AsymmetricSpec(4, 128).label() == "w4g128 rtn-asym"
    assert SymmetricSpec(2, None, 0.01).label() == "w2grow rtn-sym o0.01"
    assert FloatOffsetSpec(3, 32).label() == "w3g32 float-offset"
    assert CodebookSpec(4, 0.05).label() == "w4 codebook o0.05"
    assert KeepSpec().label() == "keep"


def test_groups_and_block_count_a_short_last_group_and_whole_rows():
    assert AsymmetricSpec(4, 128).groups(300) == 3
    assert AsymmetricSpec(4, 128).groups(256) == 2
    assert AsymmetricSpec(4, 128).groups(1) == 1
    assert AsymmetricSpec(4, 128).block(300) == 128
    assert FloatOffsetSpec(4, None).groups(300) == 1
    assert FloatOffsetSpec(4, None).block(300) == 300


def test_kept_is_true_only_for_keep():
    assert KeepSpec().kept
    assert not any(s.kept for s in EVERY_SPEC if s.scheme != "keep")


# --------------------------------------------------------------------------- make_spec


def test_make_spec_ignores_fields_the_scheme_lacks():
    assert make_spec(4, "codebook", group_size=64, outliers=0.01) == CodebookSpec(4, 0.01)
    assert make_spec(4, "rtn-sym", group_size=None, unrelated=3) == SymmetricSpec(4, None)
    assert make_spec(2, "float-offset", group_size=16) == FloatOffsetSpec(2, 16)


def test_make_spec_defaults_to_rtn_asym_with_group_128():
    spec = make_spec(3)
    assert type(spec) is AsymmetricSpec
    assert (spec.bits, spec.group_size, spec.outliers) == (3, 128, 0.0)


@pytest.mark.parametrize("scheme", [*SCHEMES, "keep", "not-a-scheme"])
def test_make_spec_maps_16_bits_to_keep_for_any_scheme(scheme):
    assert make_spec(16, scheme, group_size=8, outliers=0.1) == KeepSpec()


@pytest.mark.parametrize("scheme", ["keep", "rtn", "", "RTN-ASYM"])
def test_make_spec_refuses_an_unknown_scheme_at_quantized_widths(scheme):
    with pytest.raises(PlanError, match=f"unknown scheme {scheme!r}"):
        make_spec(4, scheme)


@pytest.mark.parametrize("bits", [1, 5, 6, 32, 0])
def test_make_spec_refuses_unsupported_widths(bits):
    with pytest.raises(PlanError, match=f"unsupported width {bits}"):
        make_spec(bits, "rtn-asym")


# --------------------------------------------------------------------------- invalid input

ASYM = {"bits": 4, "group_size": 32, "scheme": "rtn-asym"}


@pytest.mark.parametrize("data, message", [
    # widths
    ({**ASYM, "bits": 5}, "unsupported width 5"),
    ({**ASYM, "bits": 1}, "unsupported width 1"),
    ({**ASYM, "bits": -4}, "unsupported width -4"),
    ({**ASYM, "bits": 0}, "unsupported width 0"),
    ({"bits": 5, "scheme": "codebook"}, "unsupported width 5"),
    ({**ASYM, "bits": "4"}, "bits must be an integer, got '4'"),
    ({**ASYM, "bits": 4.0}, "bits must be an integer, got 4.0"),
    ({**ASYM, "bits": True}, "bits must be an integer, got True"),
    ({**ASYM, "bits": None}, "bits must be an integer, got None"),
    ({"group_size": 32, "scheme": "rtn-asym"}, "bits must be an integer, got None"),
    ({**ASYM, "bits": [4]}, r"bits must be an integer, got \[4\]"),
    # schemes
    ({**ASYM, "scheme": "rtn"}, "unknown scheme 'rtn'"),
    ({**ASYM, "scheme": "keep"}, "unknown scheme 'keep'"),
    ({**ASYM, "scheme": 4}, "unknown scheme 4"),
    ({**ASYM, "scheme": ["rtn-asym"]}, r"unknown scheme \['rtn-asym'\]"),
    ({"bits": 4, "group_size": 32}, "unknown scheme None"),
    # group sizes
    ({"bits": 4, "scheme": "rtn-asym"}, "rtn-asym needs group_size"),
    ({"bits": 4, "scheme": "rtn-sym"}, "rtn-sym needs group_size"),
    ({"bits": 4, "scheme": "float-offset"}, "float-offset needs group_size"),
    ({"bits": 4, "scheme": "float-offset-dq", "group_size": None},
     "float-offset-dq needs a group size"),
    ({**ASYM, "group_size": True}, "group_size must be an integer or null, got True"),
    ({**ASYM, "group_size": 32.0}, "group_size must be an integer or null, got 32.0"),
    ({**ASYM, "group_size": "32"}, "group_size must be an integer or null, got '32'"),
    ({**ASYM, "group_size": 0}, "group size must be a positive integer, got 0"),
    ({**ASYM, "group_size": -8}, "group size must be a positive integer, got -8"),
    # outliers
    ({**ASYM, "outliers": 0.5}, r"outlier fraction must lie in \[0, 0.5\), got 0.5"),
    ({**ASYM, "outliers": 1}, r"outlier fraction must lie in \[0, 0.5\), got 1"),
    ({**ASYM, "outliers": -0.01}, r"outlier fraction must lie in \[0, 0.5\), got -0.01"),
    ({**ASYM, "outliers": float("nan")}, r"outlier fraction must lie in \[0, 0.5\), got nan"),
    ({**ASYM, "outliers": float("inf")}, r"outlier fraction must lie in \[0, 0.5\), got inf"),
    ({"bits": 2, "scheme": "codebook", "outliers": 0.7}, "outlier fraction must lie"),
    ({**ASYM, "outliers": "0.1"}, "outliers must be a number, got '0.1'"),
    ({**ASYM, "outliers": True}, "outliers must be a number, got True"),
    ({**ASYM, "outliers": None}, "outliers must be a number, got None"),
    ({**ASYM, "outliers": [0.1]}, r"outliers must be a number, got \[0.1\]"),
    ({"bits": 2, "scheme": "codebook", "outliers": False}, "outliers must be a number"),
])
def test_invalid_spec_json_raises_plan_error_naming_the_problem(data, message):
    with pytest.raises(PlanError, match=message):
        spec_from_json(data)


@pytest.mark.parametrize("entry", [[4, "rtn-asym"], "rtn-asym", None, 4, 4.5, True])
def test_non_object_site_entry_raises_plan_error(entry):
    with pytest.raises(PlanError, match="a site entry must be an object"):
        spec_from_json(entry)


def test_unknown_scheme_error_lists_the_schemes():
    with pytest.raises(PlanError,
                       match="rtn-asym, rtn-sym, float-offset, float-offset-dq, codebook"):
        spec_from_json({**ASYM, "scheme": "gptq"})


def test_spec_constructors_validate_like_json():
    with pytest.raises(PlanError, match="keep means 16 bits, got 8"):
        KeepSpec(bits=8)
    with pytest.raises(PlanError, match="unsupported width 16"):
        AsymmetricSpec(bits=16)
    with pytest.raises(PlanError, match="group size must be a positive integer"):
        FloatOffsetSpec(bits=4, group_size=2.5)
    with pytest.raises(PlanError, match="outlier fraction"):
        CodebookSpec(bits=4, outliers=0.5)


# --------------------------------------------------------------------------- capabilities

TOY = Capabilities(
    backend="toy",
    widths={"affine": (4, 8)},
    containers={4: 4, 8: 8},
    group_size_ok=lambda g: g is not None and g % 32 == 0,
    group_size_rule="group sizes must be multiples of 32",
)


def test_capabilities_check_accepts_supported_specs_and_keep():
    for spec in (AsymmetricSpec(4, 32), SymmetricSpec(8, 128), KeepSpec()):
        assert TOY.supports(spec)
        TOY.check(spec, "layers.0.q")  # no error


@pytest.mark.parametrize("spec, label", [
    (AsymmetricSpec(2, 32), "w2g32 rtn-asym"),
    (SymmetricSpec(3, 64), "w3g64 rtn-sym"),
    (FloatOffsetSpec(4, 32), "w4g32 float-offset"),
    (CodebookSpec(4), "w4 codebook"),
    (AsymmetricSpec(4, 48), "w4g48 rtn-asym"),
    (AsymmetricSpec(4, None), "w4grow rtn-asym"),
])
def test_capabilities_check_refuses_unsupported_width_format_or_group(spec, label):
    assert not TOY.supports(spec)
    with pytest.raises(PlanError) as info:
        TOY.check(spec, "site layers.3.mlp.up")
    message = str(info.value)
    assert message.startswith("site layers.3.mlp.up: backend toy cannot store ")
    assert label in message
    assert "affine at 4/8 bits" in message
    assert "group sizes must be multiples of 32" in message


def test_packed_storage_supports_every_scheme_width_and_group():
    for scheme in SCHEMES:
        for bits in WIDTHS:
            group_size = 32 if scheme == "float-offset-dq" else None  # dq needs groups
            spec = make_spec(bits, scheme, group_size=group_size, outliers=0.1)
            assert PACKED_STORAGE.supports(spec), spec
            PACKED_STORAGE.check(spec, "x")


def test_packed_storage_stores_each_width_at_its_own_bits():
    # 3- and 6-bit codes are packed in 24-bit words, not put in 4- or 8-bit containers
    assert [PACKED_STORAGE.code_bits(b) for b in (2, 3, 4, 6, 8)] == [2, 3, 4, 6, 8]


def test_same_storage_ignores_the_backend_name_only():
    assert TOY.same_storage(dataclasses.replace(TOY, backend="other"))
    assert not TOY.same_storage(dataclasses.replace(TOY, containers={4: 4, 8: 8, 3: 4}))
    assert not TOY.same_storage(PACKED_STORAGE)
    # 3-bit codes in 4-bit containers are a different storage from the packed default
    containers = dataclasses.replace(PACKED_STORAGE, containers={2: 2, 3: 4, 4: 4, 8: 8})
    assert not PACKED_STORAGE.same_storage(containers)
