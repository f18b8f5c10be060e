import covguard


def test_version_matches_metadata():
    from importlib.metadata import version

    assert covguard.__version__ == version("covguard")
