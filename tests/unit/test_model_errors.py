"""services.runtime.model_errors: the plain errors model code raises."""

from __future__ import annotations

from services.runtime.model_errors import ArtifactError, ParamError


def test_a_param_error_names_its_field():
    error = ParamError("top_p", "must be in (0, 1]")
    assert (error.field, error.problem) == ("top_p", "must be in (0, 1]")
    assert str(error) == "top_p: must be in (0, 1]"
    assert isinstance(error, ValueError) and isinstance(ArtifactError("gone"), ValueError)
