"""The sandbox's seccomp filter: which system calls untrusted code may not make, compiled to BPF
with libseccomp (through ctypes, so that it works from any Python, a wheel install included).

The filter allows everything but what would let code step outside its sandbox or keep state
for a later request:

- new namespaces (`unshare`, `setns`, `clone` with a CLONE_NEW* flag): no user namespace, so
  no private tmpfs of half the host's RAM and no root-in-a-namespace attack surface;
- `clone3` fails with ENOSYS, so that libc falls back to `clone`, whose flags the filter can
  read (clone3 passes them in memory, out of a filter's reach);
- the kernel keyring (`keyctl`, `add_key`, `request_key`): keys outlive a run on its uid;
- mounting, kernel modules, kexec, BPF, perf, ptrace, userfaultfd, io_uring and the like:
  large kernel attack surface that no test suite needs.

A denied call fails with EPERM (ENOSYS for clone3); the process is not killed, so that
programs that probe for a feature go on without it. System calls of another ABI (x32, i386)
are killed by libseccomp's architecture check.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import tempfile

SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_CMP_MASKED_EQ = 7

# CLONE_NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET, NEWTIME
NAMESPACE_FLAGS = (0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000,
                   0x00000080)

DENIED = (
    "unshare", "setns",
    "keyctl", "add_key", "request_key",
    "mount", "umount", "umount2", "pivot_root", "chroot", "move_mount", "open_tree", "fsopen", "fsconfig",
    "fsmount", "fspick", "mount_setattr",
    "bpf", "perf_event_open", "userfaultfd", "ptrace", "process_vm_readv", "process_vm_writev",
    "io_uring_setup", "io_uring_enter", "io_uring_register",
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
    "reboot", "swapon", "swapoff", "acct", "quotactl", "quotactl_fd", "syslog", "lookup_dcookie",
    "open_by_handle_at", "name_to_handle_at", "fanotify_init", "uselib", "vhangup",
)
ENOSYS_CALLS = ("clone3",)


class SeccompUnavailable(Exception):
    """The seccomp filter cannot be built on this machine."""


class _ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                ("datum_a", ctypes.c_uint64), ("datum_b", ctypes.c_uint64)]


def _errno_action(code: int) -> int:
    return 0x00050000 | (code & 0xFFFF)


def _library(name: str | None) -> ctypes.CDLL:
    name = name or ctypes.util.find_library("seccomp") or "libseccomp.so.2"
    try:
        lib = ctypes.CDLL(name, use_errno=True)
    except OSError as exc:
        raise SeccompUnavailable(f"libseccomp cannot be loaded ({exc}); install libseccomp2 "
                                 "(scripts/system-deps.sh)") from None
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint,
                                           ctypes.POINTER(_ArgCmp)]
    lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
    return lib


def build_filter(library: str | None = None) -> bytes:
    """The filter as a BPF program (what bwrap's --seccomp reads); SeccompUnavailable if
    libseccomp (found by its usual name, or the `library` path) is missing or refuses a rule."""
    lib = _library(library)
    context = lib.seccomp_init(SCMP_ACT_ALLOW)
    if not context:
        raise SeccompUnavailable("seccomp_init failed")
    try:
        def add(name: str, action: int, *conditions: _ArgCmp) -> None:
            number = lib.seccomp_syscall_resolve_name(name.encode())
            if number < 0:
                return  # not a system call on this architecture (e.g. umount on aarch64)
            array = (_ArgCmp * len(conditions))(*conditions) if conditions else None
            status = lib.seccomp_rule_add_array(context, action, number, len(conditions), array)
            if status < 0:
                raise SeccompUnavailable(f"libseccomp refused the rule for {name}: {os.strerror(-status)}")

        for name in DENIED:
            add(name, _errno_action(errno.EPERM))
        for name in ENOSYS_CALLS:
            add(name, _errno_action(errno.ENOSYS))
        for flag in NAMESPACE_FLAGS:  # one rule per flag: libseccomp has no "flags & mask != 0"
            add("clone", _errno_action(errno.EPERM), _ArgCmp(0, SCMP_CMP_MASKED_EQ, flag, flag))
        with tempfile.TemporaryFile() as exported:
            status = lib.seccomp_export_bpf(context, exported.fileno())
            if status < 0:
                raise SeccompUnavailable(f"seccomp_export_bpf failed: {os.strerror(-status)}")
            exported.seek(0)
            program = exported.read()
    finally:
        lib.seccomp_release(context)
    if not program or len(program) % 8:
        raise SeccompUnavailable("libseccomp exported an empty or malformed filter")
    return program
