"""Writing a new token into a user's file: ``gpu-broker token create --output FILE``.

The file is created, never overwritten (``O_CREAT | O_EXCL | O_NOFOLLOW``: an existing file or
a symlink there is refused), mode 0600, in parent directories created 0700. Run as root, the
whole write happens in a child process that has become ``--user``'s Unix user (their groups
too): the file and the directories it makes are theirs, and a symlink they planted on the way
cannot make root write anywhere they could not write themselves. ``broker.cli`` calls
``check_output`` before it makes the token (a refusal leaves nothing behind) and
``write_token_file`` after.
"""

from __future__ import annotations

import os
import pwd
import stat
from pathlib import Path

from broker.errors import BrokerError


class TokenFileError(BrokerError):
    """The token file cannot be written where asked (the message says why, the hint how)."""


def check_output(path: Path, user: str) -> None:
    """Refuse an existing file or symlink at ``path``, and (as root) a ``user`` with no Unix
    account here, before any token is made."""
    if os.path.lexists(path):
        what = "a symlink" if path.is_symlink() else "a file" if path.is_file() else "something"
        raise TokenFileError(
            f"{path} exists ({what}): a token is written only to a new file",
            "remove it first (a user who wants a new token: revoke the old one too), or choose "
            "another path, or print the token with --output -",
        )
    if os.geteuid() == 0:
        _unix_user(user, path)


def write_token_file(path: Path, text: str, user: str) -> str:
    """Create ``path`` with ``text`` (see the module's docstring); returns who owns it."""
    if os.geteuid() != 0:
        _create(path, text)
        return pwd.getpwuid(os.geteuid()).pw_name
    entry = _unix_user(user, path)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: become the user, write, report on the pipe
        os.close(read)
        status = 0
        try:
            os.initgroups(user, entry.pw_gid)
            os.setgid(entry.pw_gid)
            os.setuid(entry.pw_uid)
            _create(path, text)
        except BaseException as exc:
            os.write(write, str(exc).encode()[:4000])
            status = 1
        finally:
            os._exit(status)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        message = pipe.read().decode(errors="replace")
    _, status = os.waitpid(pid, 0)
    if status != 0:
        raise TokenFileError(
            message or f"could not write {path} as {user}",
            f"the file and its folders are made as {user}: check that {user} may create them",
        )
    return user


def _unix_user(user: str, path: Path) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(user)
    except KeyError:
        raise TokenFileError(
            f"there is no Unix user {user!r} here to own {path}",
            "print the token with --output - and hand it to the user, or run the command as "
            "that user",
        ) from None


def _create(path: Path, text: str) -> None:
    """Make the missing parent directories 0700 and the file 0600, as the current user."""
    os.umask(0o077)
    missing = []
    parent = path.parent
    while not os.path.lexists(parent):
        missing.append(parent)
        parent = parent.parent
    for directory in reversed(missing):
        os.mkdir(directory, 0o700)
    if not stat.S_ISDIR(os.stat(path.parent).st_mode):
        raise TokenFileError(f"{path.parent} is not a directory")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        raise TokenFileError(f"{path} exists: a token is written only to a new file") from None
    except OSError as exc:
        raise TokenFileError(f"cannot create {path}: {exc.strerror}") from None
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, text.encode())
    finally:
        os.close(fd)
