# Records the git revision pauserec is built from as pauserec/_build_info.py, so that benchmark
# results name it even when pauserec runs from an installed wheel rather than a checkout
# (pauserec.bench.env.git_revision reads it). Outside a git checkout (an sdist) GIT_SHA is "".
find_package(Git QUIET)
set(PAUSEREC_GIT_SHA "")
if(GIT_FOUND)
  execute_process(COMMAND "${GIT_EXECUTABLE}" rev-parse HEAD
                  WORKING_DIRECTORY "${CMAKE_CURRENT_SOURCE_DIR}" RESULT_VARIABLE _pauserec_git_rc
                  OUTPUT_VARIABLE PAUSEREC_GIT_SHA OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
  if(NOT _pauserec_git_rc EQUAL 0)
    set(PAUSEREC_GIT_SHA "")
  endif()
  if(PAUSEREC_GIT_SHA)
    execute_process(COMMAND "${GIT_EXECUTABLE}" status --porcelain --untracked-files=no
                    WORKING_DIRECTORY "${CMAKE_CURRENT_SOURCE_DIR}"
                    OUTPUT_VARIABLE _pauserec_git_dirty OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
    if(_pauserec_git_dirty)
      string(APPEND PAUSEREC_GIT_SHA "-dirty")
    endif()
  endif()
endif()
string(TIMESTAMP _pauserec_built "%Y-%m-%dT%H:%M:%SZ" UTC)
file(WRITE "${CMAKE_CURRENT_BINARY_DIR}/_build_info.py"
     "\"\"\"Written at build time by cmake/build_info.cmake.\"\"\"\n\nGIT_SHA = \"${PAUSEREC_GIT_SHA}\"\nBUILT = \"${_pauserec_built}\"\n")
install(FILES "${CMAKE_CURRENT_BINARY_DIR}/_build_info.py" DESTINATION ${PAUSEREC_INSTALL_DIR})
