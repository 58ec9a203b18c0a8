#!/usr/bin/env bash
# System packages the test suite needs on Debian/Ubuntu: the real adb client (device_bench talks to a
# loopback test device), the aarch64 cross toolchain and qemu-user (the edge-board runner build is run
# under emulation), a JDK (jni.h for the Android JNI bridge compiled on Linux; javac for its pure logic),
# aapt with the framework resources (the Android manifest and resources are packaged to check them), and the JSON
# libraries the native core and the app logic read JSON with (nlohmann/json, header-only; org.json for desktop Java).
set -euo pipefail
pkgs=(adb binutils g++-aarch64-linux-gnu qemu-user-static openjdk-17-jdk-headless aapt android-framework-res
      nlohmann-json3-dev libandroid-json-java)
missing=()
for p in "${pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" -ne 0 ] && sudo=sudo
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
