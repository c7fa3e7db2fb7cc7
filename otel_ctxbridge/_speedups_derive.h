/* derive_context's common case in C: writing plain printable values of propagated fields into a
 * new baggage dict and a new Context, without a Python call.
 * Included once by _speedups.c (one translation unit), after the declarations it uses. */

/* Write `value` of field `name` into `bag` when it is a valid plain value of a propagated
 * field with the default or a regex check (see ContextBridge._plans). 1: written; 0: a case
 * for the Python path (unknown field, invalid value, ...); -1: an error (set). `name` and
 * `value` are exact str objects the caller holds. */
static int
write_value(PyObject *plans, PyObject *bag, PyObject *name, PyObject *value, Py_ssize_t *chars)
{
    PyObject *plan = PyDict_GetItemWithError(plans, name); /* an exact str: no Python code */
    if (plan == NULL) {
        return PyErr_Occurred() ? -1 : 0; /* an unknown field: the Python path names it */
    }
    if (!PyTuple_CheckExact(plan) || PyTuple_GET_SIZE(plan) != 3) {
        return 0;
    }
    Py_INCREF(plan); /* held: a regex match may run a signal handler */
    int result = 0;
    PyObject *bag_key = PyTuple_GET_ITEM(plan, 0);
    PyObject *check = PyTuple_GET_ITEM(plan, 2);
    Py_ssize_t limit = PyLong_AsSsize_t(PyTuple_GET_ITEM(plan, 1));
    if (limit == -1 && PyErr_Occurred()) {
        result = -1;
        goto done;
    }
    if (bag_key == Py_None || check == Py_False || !PyUnicode_CheckExact(bag_key)) {
        goto done; /* process-local, or a callable validator: the Python path */
    }
#if PY_VERSION_HEX < 0x030C0000
    if (PyUnicode_READY(value) < 0 || PyUnicode_READY(bag_key) < 0) {
        result = -1;
        goto done;
    }
#endif
    Py_ssize_t length = PyUnicode_GET_LENGTH(value);
    if (length > limit) {
        goto done; /* invalid: the Python path raises ContextValueError */
    }
    if (length > 0 && (Py_UNICODE_ISSPACE(PyUnicode_READ_CHAR(value, 0)) ||
                       Py_UNICODE_ISSPACE(PyUnicode_READ_CHAR(value, length - 1)))) {
        goto done; /* whitespace at an end, which propagators strip: the Python path refuses */
    }
    if (check == Py_True) { /* the default check: printable text */
        if (!is_printable(value)) {
            goto done;
        }
    }
    else { /* a regex validator's fullmatch, for ASCII (others: UTF-8 checked first) */
        if (!PyUnicode_IS_ASCII(value)) {
            goto done;
        }
        PyObject *match = PyObject_CallOneArg(check, value);
        if (match == NULL) {
            /* Field.problem() reports a validator that raises as a ContextValueError */
            result = PyErr_ExceptionMatches(PyExc_Exception) ? (PyErr_Clear(), 0) : -1;
            goto done;
        }
        int valid = match != Py_None;
        Py_DECREF(match);
        if (!valid) {
            goto done;
        }
    }
    if (PyDict_SetItem(bag, bag_key, value) < 0) {
        result = -1;
        goto done;
    }
    if (*chars >= 0) {
        *chars += length + PyUnicode_GET_LENGTH(bag_key) + 2;
    }
    result = 1;
done:
    Py_DECREF(plan);
    return result;
}

/* derive_context's common case. Returns a new context, NULL with an exception set, or
 * NULL without one when the case is not common (the caller then runs the Python one). The
 * context's baggage and state are `into` when given (a `with` block's ScopeState, blank). */
static PyObject *
fast_derive(PyObject *key, PyObject *plans, PyObject *ctx, PyObject *values, PyObject *frame_arg,
            ScopeState *into)
{
    PyObject *parent = NULL, *frame = NULL, *old = NULL, *bag = NULL, *state = NULL;
    PyObject *result = NULL, *name, *value;
    Py_ssize_t chars = 0; /* characters written, for the cheap limits bound; -1 unknown */
    Py_ssize_t pos = 0;
    int inherited, written;
    if (!context_is_plain || !PyDict_CheckExact(values) || PyDict_GET_SIZE(values) == 0 ||
        !PyDict_Check(ctx) || !PyDict_CheckExact(plans)) {
        return NULL; /* (no values: the Python path leaves the baggage as it is) */
    }
    parent = PyDict_GetItemWithError(ctx, key);
    if (parent == NULL && PyErr_Occurred()) {
        goto error;
    }
    if (parent == Py_None) {
        parent = NULL;
    }
    Py_XINCREF(parent); /* held: the calls below may run Python code */
    if (parent != NULL) {
        StateFields *fields = fields_of(parent);
        if (fields == NULL) {
            goto not_handled; /* no compiled state (a copied snapshot's plain dict): state_in */
        }
        frame = fields->frame;
        if (frame == NULL || fields->local == NULL) {
            goto not_handled; /* a state cleared by the garbage collector */
        }
        Py_INCREF(frame);
        if (frame != Py_None) { /* updates to catch up: the Python path merges them */
            PyObject *updates = PyObject_GetAttr(frame, str_updates);
            if (updates == NULL) {
                goto error;
            }
            int pending = PyObject_IsTrue(updates);
            Py_DECREF(updates);
            if (pending != 0) {
                goto not_handled_or_error;
            }
        }
    }
    old = PyDict_GetItemWithError(ctx, config.baggage_key);
    if (old == NULL && PyErr_Occurred()) {
        goto error;
    }
    Py_XINCREF(old);
    inherited = old == NULL ? 0 : PyObject_IsTrue(old);
    if (inherited < 0) {
        goto error;
    }
    if (inherited && !PyDict_Check(old)) {
        goto not_handled;
    }
    if (into != NULL) { /* the baggage is the ScopeState: one object for both */
        bag = (PyObject *)into;
        Py_INCREF(bag);
        if (inherited && PyDict_Update(bag, old) < 0) {
            goto error;
        }
    }
    else {
        bag = inherited ? PyDict_Copy(old) : PyDict_New();
        if (bag == NULL) {
            goto error;
        }
    }
    if (inherited) {
        chars = -1;
    }
    while (PyDict_Next(values, &pos, &name, &value)) {
        if (!PyUnicode_CheckExact(name) || !PyUnicode_CheckExact(value)) {
            goto not_handled; /* unset (None), not a str, or a str subclass: Python */
        }
        Py_INCREF(name);
        Py_INCREF(value);
        written = write_value(plans, bag, name, value, &chars);
        Py_DECREF(name);
        Py_DECREF(value);
        if (written <= 0) {
            goto not_handled_or_error;
        }
    }
    if (chars < 0 || 12 * chars > config.member_limit) {
        PyObject *exceeds = PyObject_CallOneArg(config.may_exceed_limits, bag);
        if (exceeds == NULL) {
            goto error;
        }
        int unsure = PyObject_IsTrue(exceeds);
        Py_DECREF(exceeds);
        if (unsure != 0) {
            goto not_handled_or_error; /* the Python path checks the limits exactly */
        }
    }
    state = derived_state(parent, frame, frame_arg, into);
    if (state == NULL) {
        goto error;
    }
    /* Context(ctx): configure() checked that Context keeps dict's __new__ and __init__. */
    result = ((PyTypeObject *)config.context_type)->tp_new(
        (PyTypeObject *)config.context_type, empty_tuple, NULL);
    if (result == NULL) {
        goto error;
    }
    if (PyDict_Merge(result, ctx, 1) < 0 || PyDict_SetItem(result, config.baggage_key, bag) < 0 ||
        PyDict_SetItem(result, key, state) < 0) {
        goto error;
    }
    goto done;
not_handled_or_error:
    if (PyErr_Occurred()) {
        goto error;
    }
not_handled:
error:
    Py_CLEAR(result);
    if (into != NULL) {
        PyDict_Clear((PyObject *)into); /* blank again: only the block's way back */
    }
done:
    Py_XDECREF(parent);
    Py_XDECREF(frame);
    Py_XDECREF(old);
    Py_XDECREF(bag);
    Py_XDECREF(state);
    return result;
}
