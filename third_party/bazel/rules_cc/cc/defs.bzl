"""Offline stub of @rules_cc//cc:defs.bzl for Bazel 4.

@bazel_tools (e.g. tools/cpp/BUILD, tools/jdk/BUILD) loads these symbols even
for pure-Python builds, and Bazel would otherwise download rules_cc from
GitHub. The native rules are built into Bazel 4, so we just re-export them.
"""

cc_binary = native.cc_binary
cc_import = native.cc_import
cc_library = native.cc_library
cc_proto_library = native.cc_proto_library
cc_test = native.cc_test
cc_toolchain = native.cc_toolchain
cc_toolchain_suite = native.cc_toolchain_suite
objc_library = native.objc_library
