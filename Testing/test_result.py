"""The run's result and report.json (result.py): one schema, written and read in one place."""

import json

import numpy as np
import pytest

from conftest import to_image
from SACDiffLib.config import DetectConfig
from SACDiffLib.errors import SACDiffError
from SACDiffLib.postprocess import rethreshold
from SACDiffLib.result import REPORT_VERSION, DetectionResult, read_report, report_document

WRITTEN_ORDER = ["lambda", "threshold", "crf", "processed_slices", "analysis_box", "quantification", "ct",
                 "ct_fingerprint", "lung_mask", "device", "timings", "network_evaluations",
                 "processed_voxel_fraction", "chunk", "config", "sacdiff_report_version", "seed", "detect", "versions",
                 "slice_scores", "units"]


def _result(lam=2.0):
    rng = np.random.default_rng(0)
    lung = np.zeros((4, 16, 16), np.uint8)
    lung[:, 4:12, 2:7], lung[:, 4:12, 9:14] = 1, 2
    error = rng.gamma(2.0, 0.01, lung.shape).astype(np.float32)
    error[1, 6:9, 3:6] += 1.0
    result = DetectionResult(reference=to_image(np.zeros(lung.shape, np.float32)), ct_hu=None, lung=lung,
                             processed=np.arange(4), error=error, uncertainty_hu=None, pseudo_healthy_hu=None,
                             detect=DetectConfig(crf=False), box=(0, 16, 0, 16))
    return rethreshold(result, lam)


def test_a_result_is_built_by_keyword_only():
    with pytest.raises(TypeError):
        DetectionResult(None, None, None, None, None, None, None, DetectConfig())  # noqa: the old positional form


def test_the_report_is_composed_from_the_fields_in_the_documented_order():
    result = _result()
    result.facts = {"ct": "/x/ct.nii.gz", "ct_fingerprint": {}, "lung_mask": "given", "device": "cpu",
                    "timings": {"total_s": 1.0}, "network_evaluations": 120, "processed_voxel_fraction": 0.5,
                    "chunk": {}, "config": {}}
    doc = report_document(result, {"sacdiff": "test"})
    assert list(doc) == WRITTEN_ORDER
    assert doc["lambda"] == doc["threshold"]["lam"] == 2.0 and doc["sacdiff_report_version"] == REPORT_VERSION
    assert doc["slice_scores"] == result.quantification["slice_anomaly_ml"]
    assert doc["versions"] == {"sacdiff": "test"} and "threshold_versions" not in doc
    rethreshold(result, 5.0)  # the binarisation is re-composed, the facts kept
    again = report_document(result, {"sacdiff": "test"})
    assert again["lambda"] == 5.0 and again["detect"]["lam"] == 5.0 and again["device"] == "cpu"
    assert again["threshold"]["alpha"] > doc["threshold"]["alpha"]


def test_a_re_thresholded_report_keeps_the_versions_that_made_the_maps_and_unknown_keys():
    result = _result()
    result.facts = {"versions": {"sacdiff": "old", "torch": "2.0"}, "lambda": 99, "from_a_later_version": 1}
    doc = report_document(result, {"sacdiff": "new", "torch": "not loaded"})
    assert doc["versions"] == {"sacdiff": "old", "torch": "2.0"}
    assert doc["threshold_versions"] == {"sacdiff": "new"} and list(doc)[-1] == "threshold_versions"
    assert doc["lambda"] == 2.0 and doc["from_a_later_version"] == 1  # a stale binarisation key is not kept


def test_an_undefined_ratio_is_null_and_infinity_an_error():
    from SACDiffLib.result import report_text

    result = _result()
    result.quantification = dict(result.quantification, left_anomaly_percent=float("nan"))
    assert json.loads(report_text(result, {}))["quantification"]["left_anomaly_percent"] is None
    result.quantification["left_anomaly_percent"] = float("inf")
    with pytest.raises(ValueError):
        report_text(result, {})


@pytest.mark.parametrize("content, says", [("{", "not valid JSON"), ("[1, 2]", "not a SACDiff report"),
                                           ('{"detect": {}}', "lacks processed_slices, threshold")])
def test_a_damaged_report_gets_one_line(tmp_path, content, says):
    path = tmp_path / "report.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(SACDiffError, match=says) as err:
        read_report(path, "; run it again")
    assert str(err.value).endswith("; run it again") and "\n" not in str(err.value)


def test_rethresholding_with_another_background_region_recomputes_it_and_the_report_names_it():
    """The cached background statistics belong to one region: switching ``detect.background`` recomputes them (the
    shell's own median and MAD, measured here by hand), and report.json's threshold says which region made α."""
    import dataclasses

    from SACDiffLib.postprocess import Threshold, _background

    result = _result()
    body = result.threshold
    result.detect = dataclasses.replace(result.detect, background="lung-shell")
    rethreshold(result, 2.0)
    shell = _background(result.error, result.lung, result.processed, None, result.box, "lung-shell", (1.5, 1.5))
    location = float(np.median(shell))
    assert result.threshold.region == "lung-shell" and result.threshold.background_location == pytest.approx(location)
    assert result.threshold.background_scale == pytest.approx(1.4826 * float(np.median(np.abs(shell - location))))
    assert (body.region, body.background_location) != ("lung-shell", location)
    assert report_document(result, {})["threshold"]["region"] == "lung-shell"
    older = {"alpha": 0.1, "background_location": 0.05, "background_scale": 0.02, "lam": 2.0, "mode": "adaptive"}
    assert Threshold.from_report(older).region == "body"  # a report from before the region: Section 2.4's body
