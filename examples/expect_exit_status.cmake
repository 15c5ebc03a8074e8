# Runs COMMAND (a ;-list) and fails unless its exit status is STATUS and its standard error
# matches STDERR_REGEX. Used by the examples' tests: cmake -DCOMMAND=... -DSTATUS=2 -P this.
execute_process(COMMAND ${COMMAND} RESULT_VARIABLE status ERROR_VARIABLE stderr
                OUTPUT_VARIABLE stdout)
if(NOT "${status}" STREQUAL "${STATUS}")
  message(FATAL_ERROR "expected exit status ${STATUS}, got '${status}'\nstderr: ${stderr}")
endif()
if(DEFINED STDERR_REGEX AND NOT stderr MATCHES "${STDERR_REGEX}")
  message(FATAL_ERROR "stderr does not match '${STDERR_REGEX}':\n${stderr}")
endif()
message(STATUS "exit status ${status}; stderr: ${stderr}")
