# Cross-compile for 32-bit ARM Linux boards (Raspberry Pi 3 with a 32-bit OS), hard float:
# apt-get install g++-arm-linux-gnueabihf. PyPI has no armv7 TVM runtime: the kit's lib/ must
# hold one built from TVM's sources (see the kit's README).
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR armv7l)
set(CMAKE_CXX_COMPILER arm-linux-gnueabihf-g++)
set(CMAKE_FIND_ROOT_PATH /usr/arm-linux-gnueabihf)
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
