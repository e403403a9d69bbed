"""Methods boilerplate: method texts, the bibliography, citation rendering, LiterateWorkflow."""

import re

import pytest

from qsmprep.config import method_choices
from qsmprep.reports.boilerplate import (
    bibliography,
    cited_keys,
    latex_to_text,
    parse_bibtex,
    render,
    write_citation_files,
)
from qsmprep.workflows.boilerplate import METHOD_TEXT, REPORT_POSTDESC, participant_desc, qsm_desc

ALGORITHM_PAPERS = {
    "graf2024", "liu2019qsminvnet", "ulyanov2018", "dymerska2021", "eckstein2018",
    "li2011vsharp", "liu2011pdf", "zhou2014lbv", "wen2014ismv", "shmueli2009", "kames2018",
    "bilgic2014", "li2015ilsqr", "stewart2022", "pei2015", "haacke2004",
}  # fmt: skip


def test_every_registry_method_has_a_text_and_its_citations_exist():
    bib = bibliography()
    for stage, names in method_choices().items():
        for name in names:
            if stage == "masking" and name == "auto":
                continue  # resolved to a method before any workflow is built
            text = METHOD_TEXT[stage][name]
            assert set(cited_keys(text)) <= set(bib), (stage, name)
    for stage in ("r2star", "refine"):
        for text in METHOD_TEXT[stage].values():
            assert set(cited_keys(text)) <= set(bib)


def test_bibliography_has_the_seeds_and_every_algorithm_with_a_doi_or_arxiv():
    bib = bibliography()
    assert ALGORITHM_PAPERS <= set(bib)
    for key in ALGORITHM_PAPERS:
        entry = bib[key]
        assert entry.text("title") and entry.text("year").isdigit(), key
        assert re.match(r"10\.\d{4,5}/", entry.text("doi")), key
    assert "adaptive convolution" in bib["graf2024"].text("title")
    assert bib["graf2024"].text("pages") == "1366165"
    assert "1904.05493" in bib["liu2019qsminvnet"].text("journal")


def test_descriptions_follow_the_choices():
    text = qsm_desc(unwrapping="romeo", bf_removal="vsharp", inversion="adaptive-unet",
                    masking="quality", mcpc3ds=True, r2star="arlo", swi=True)  # fmt: skip
    keys = cited_keys(text)
    for key in ("dymerska2021", "eckstein2018", "li2011vsharp", "graf2024",
                "liu2019qsminvnet", "pei2015", "haacke2004", "otsu1979"):  # fmt: skip
        assert key in keys
    # the quality mask is made from ROMEO's quality, so it is described after the unwrapping
    assert text.index("unwrapped with ROMEO") < text.index("A brain mask")
    plain = qsm_desc(unwrapping="laplacian", bf_removal="pdf", inversion="tkd",
                     masking="threshold", input_type="unwrapped")  # fmt: skip
    assert "unwrapped with" not in plain and "provided unwrapped" in plain
    assert "shmueli2009" in cited_keys(plain) and "eckstein2018" not in cited_keys(plain)
    assert "ulyanov2018" in cited_keys(
        qsm_desc(
            unwrapping="romeo",
            bf_removal="pdf",
            inversion="adaptive-unet",
            masking="quality",
            refine="dip",
        )  # fmt: skip
    )
    fmap = qsm_desc(unwrapping="romeo", bf_removal="lbv", inversion="rts", masking="threshold",
                    input_type="fieldmap", user_mask=True)  # fmt: skip
    assert "total field map" in fmap and "provided by the user" in fmap
    assert "echo time" not in fmap.split("magnitude.")[1]


def test_participant_desc_has_versions():
    import nipype

    assert f"Nipype {nipype.__version__}" in participant_desc()


def test_render_numbers_citations_in_order_and_lists_only_cited():
    text = "A [@dymerska2021]. B [@liu2011pdf; @dymerska2021].\n\nC [@bilgic2014]."
    out = render(text)
    assert "A [1]. B [2, 1]." in out.markdown and "C [3]." in out.markdown
    assert [e.key for e in out.references] == ["dymerska2021", "liu2011pdf", "bilgic2014"]
    assert out.html.count("<p>") == 2 and 'href="#ref-2"' in out.html
    assert "Dymerska B" in out.markdown and "doi:10.1002/mrm.28563" in out.markdown
    assert set(parse_bibtex(out.bibtex)) == {"dymerska2021", "liu2011pdf", "bilgic2014"}
    with pytest.raises(KeyError, match="nosuchpaper"):
        render("x [@nosuchpaper]")


def test_latex_accents_and_bib_errors():
    assert latex_to_text("Jos{\\'e} P. and Sch{\\\"a}fer \\& co") == "José P. and Schäfer & co"
    with pytest.raises(ValueError, match="duplicate"):
        parse_bibtex("@article{a, title={x}}\n@article{a, title={y}}")


def test_citation_files(tmp_path):
    write_citation_files("Text [@kames2018].\n\n" + REPORT_POSTDESC, tmp_path / "logs")
    md = (tmp_path / "logs" / "CITATION.md").read_text()
    assert "Text [1]." in md and "Kames C" in md
    assert "@article{kames2018" in (tmp_path / "logs" / "CITATION.bib").read_text()
    page = (tmp_path / "logs" / "CITATION.html").read_text()
    assert '<li id="ref-1">' in page and "http" not in page.split("<body>")[0]


def test_participant_workflow_visits_every_description(tmp_path):
    from qsmprep.bids import MEGRERun
    from qsmprep.workflows import init_participant_wf

    runs = [
        MEGRERun(
            "01",
            None,
            {"subject": "01", "acquisition": a},
            "MEGRE",
            (str(tmp_path / "m.nii.gz"),),
            (str(tmp_path / "p.nii.gz"),),
            (0.01,),
            3.0,
            "rad",
            (4, 4, 4),
        )  # fmt: skip
        for a in ("a", "b")
    ]
    wf = init_participant_wf("01", runs, bids_dir=tmp_path, output_dir=tmp_path / "out",
                             unwrapping="romeo", bf_removal="pdf", inversion="tv",
                             masking="quality")  # fmt: skip
    text = wf.visit_desc()
    paragraphs = text.split("\n\n")
    assert paragraphs[0].startswith("Results included in this manuscript")
    assert paragraphs[-1] == REPORT_POSTDESC
    assert len(paragraphs) == 3  # the two runs' identical paragraphs appear once
    render(text)  # every citation resolves
