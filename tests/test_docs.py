"""The documentation that is made from the code stays current."""

import settings


def test_the_flag_reference_is_made_from_the_settings_declarations():
    with open(settings.REFERENCE, encoding="utf-8") as f:
        assert f.read() == settings.reference(), "docs/flags.md is stale: run python settings.py"


def test_the_reference_has_every_flag_of_every_script():
    text = settings.reference()
    for script, path in settings.SCRIPTS.items():
        module, name = path.rsplit(".", 1)
        cls = getattr(__import__(module), name)
        for field in settings.dataclasses.fields(cls):
            assert f"`{settings.flag(field)}`" in text, (script, field.name)
