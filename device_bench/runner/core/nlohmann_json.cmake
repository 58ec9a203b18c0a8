# nlohmann_json.cmake -- nlohmann/json (header-only, https://github.com/nlohmann/json) for the firstkit runner core,
# as the INTERFACE target firstkit::nlohmann_json. Included by device_bench/runner/CMakeLists.txt and by the Android
# app's android_demo/app/src/main/cpp/CMakeLists.txt (which finds this core folder through FIRSTKIT_CORE_DIR).
#
# Where the header comes from, first match wins:
#   -DFIRSTKIT_NLOHMANN_INCLUDE=DIR   a directory holding nlohmann/json.hpp
#   find_package(nlohmann_json CONFIG) (Debian/Ubuntu nlohmann-json3-dev, Homebrew nlohmann-json, vcpkg, ...)
#   find_path(nlohmann/json.hpp)
# The library is header-only and the same for every architecture, so a cross build (toolchains/aarch64-linux-gnu.cmake,
# the Android NDK) uses the build host's copy: both searches also look outside CMAKE_FIND_ROOT_PATH. The nlohmann/
# folder found is copied into the build tree and only that copy goes on the include path: the host's /usr/include
# itself must not, it would put the host's C library headers in front of the cross toolchain's.
include_guard(GLOBAL)

set(FIRSTKIT_NLOHMANN_INCLUDE "" CACHE PATH "directory holding nlohmann/json.hpp (default: search for nlohmann_json)")

set(_fk_nlohmann_dir "")
if(FIRSTKIT_NLOHMANN_INCLUDE)
  if(NOT EXISTS "${FIRSTKIT_NLOHMANN_INCLUDE}/nlohmann/json.hpp")
    message(FATAL_ERROR "FIRSTKIT_NLOHMANN_INCLUDE='${FIRSTKIT_NLOHMANN_INCLUDE}' holds no nlohmann/json.hpp")
  endif()
  set(_fk_nlohmann_dir "${FIRSTKIT_NLOHMANN_INCLUDE}")
else()
  find_package(nlohmann_json 3.9 CONFIG QUIET CMAKE_FIND_ROOT_PATH_BOTH)
  if(TARGET nlohmann_json::nlohmann_json)
    get_target_property(_fk_nlohmann_incs nlohmann_json::nlohmann_json INTERFACE_INCLUDE_DIRECTORIES)
    foreach(_d IN LISTS _fk_nlohmann_incs)
      if(NOT _fk_nlohmann_dir AND EXISTS "${_d}/nlohmann/json.hpp")
        set(_fk_nlohmann_dir "${_d}")
      endif()
    endforeach()
  endif()
  if(NOT _fk_nlohmann_dir)
    find_path(FIRSTKIT_NLOHMANN_FOUND nlohmann/json.hpp
              PATHS /usr/include /usr/local/include /opt/homebrew/include
              CMAKE_FIND_ROOT_PATH_BOTH
              DOC "directory holding nlohmann/json.hpp (found by the firstkit core)")
    if(FIRSTKIT_NLOHMANN_FOUND)
      set(_fk_nlohmann_dir "${FIRSTKIT_NLOHMANN_FOUND}")
    endif()
  endif()
endif()
if(NOT _fk_nlohmann_dir)
  message(FATAL_ERROR "nlohmann/json.hpp not found: install nlohmann-json3-dev (tests/install_system_deps.sh; "
                      "Homebrew: nlohmann-json) or pass -DFIRSTKIT_NLOHMANN_INCLUDE=DIR (DIR/nlohmann/json.hpp)")
endif()

# Copy nlohmann/ alone into the build tree (again when the source folder changed), and reconfigure when the
# header changes. file(COPY) keeps the timestamps, so an unchanged header rebuilds nothing.
set(_fk_nlohmann_copy "${CMAKE_BINARY_DIR}/firstkit-nlohmann/include")
if(NOT "${_FK_NLOHMANN_COPIED_FROM}" STREQUAL "${_fk_nlohmann_dir}")
  file(REMOVE_RECURSE "${_fk_nlohmann_copy}")
endif()
file(COPY "${_fk_nlohmann_dir}/nlohmann" DESTINATION "${_fk_nlohmann_copy}")
set(_FK_NLOHMANN_COPIED_FROM "${_fk_nlohmann_dir}" CACHE INTERNAL "where firstkit-nlohmann/ was copied from")
set_property(DIRECTORY APPEND PROPERTY CMAKE_CONFIGURE_DEPENDS "${_fk_nlohmann_dir}/nlohmann/json.hpp")
message(STATUS "nlohmann/json: ${_fk_nlohmann_dir}/nlohmann (include path: ${_fk_nlohmann_copy})")

add_library(firstkit_nlohmann_json INTERFACE)
target_include_directories(firstkit_nlohmann_json SYSTEM INTERFACE "${_fk_nlohmann_copy}")
add_library(firstkit::nlohmann_json ALIAS firstkit_nlohmann_json)
