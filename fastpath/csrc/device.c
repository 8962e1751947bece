/* Device header checks (spec/device.md DEV-2, DEV-12..DEV-14); see include/nk/device.h. */
#include "nk/device.h"
