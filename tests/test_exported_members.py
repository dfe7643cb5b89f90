import choreo


def test_all_exports_exist_and_are_documented() -> None:
    exported = set(choreo.__all__)
    public = {name for name in dir(choreo) if not name.startswith("_")}
    modules = {name for name in public if type(getattr(choreo, name)).__name__ == "module"}
    assert public - modules - {"annotations"} == exported
    for name in exported:
        assert getattr(choreo, name).__doc__, f"{name} has no docstring"
