"""Hostile inputs shared by tests: a pickle payload that would run code if unpickled, and the verify verb."""

from telepathy.__main__ import main as telepathy_main


def verify(path, capsys, *extra):
    code = telepathy_main(["verify", str(path), *extra])
    return code, capsys.readouterr().out


class _Payload:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))
