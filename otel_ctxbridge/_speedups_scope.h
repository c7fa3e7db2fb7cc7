/* ScopeMaker (the compiled bridge.scope) and ScopeCore (entering and leaving a scope).
 * Included once by _speedups.c (one translation unit), after the declarations it uses. */

/* ScopeMaker: what bridge.scope is when this module is built, a callable made once per
 * bridge that holds what entering needs (the bridge's context key and field plans). */
typedef struct {
    PyObject_HEAD
    PyObject *bridge;
    PyObject *key;        /* bridge._key */
    PyObject *plans;      /* bridge._plans */
    PyTypeObject *scope;  /* the class of the scopes it makes (_scope.Scope) */
    Stand stand;          /* ContextBridge.scope */
    vectorcallfunc vectorcall;
} ScopeMaker;

typedef struct {
    PyObject_HEAD
    ScopeMaker *maker;
    PyObject *values; /* None once entered */
    PyObject *token;  /* the ContextVar token while entered, else NULL (see exit_state) */
    ScopeState *exit_state; /* made when __exit__ is looked up before entering (`with`) */
} ScopeCore;

static PyTypeObject *scope_core_type; /* ScopeCore, below */
static PyObject *maker_vectorcall(ScopeMaker *, PyObject *const *, size_t, PyObject *);

static PyObject *
new_maker(PyObject *bridge, PyTypeObject *scope)
{
    if (!PyType_IsSubtype(scope, scope_core_type)) {
        PyErr_SetString(PyExc_TypeError, "scope_type must be a subclass of ScopeCore");
        return NULL;
    }
    PyObject *key = PyObject_GetAttr(bridge, str_key);
    if (key == NULL) {
        return NULL;
    }
    PyObject *plans = PyObject_GetAttr(bridge, str_plans);
    if (plans == NULL) {
        Py_DECREF(key);
        return NULL;
    }
    ScopeMaker *maker = PyObject_GC_New(ScopeMaker, maker_type);
    if (maker == NULL) {
        Py_DECREF(key);
        Py_DECREF(plans);
        return NULL;
    }
    Py_INCREF(bridge);
    Py_INCREF(scope);
    maker->bridge = bridge;
    maker->key = key;
    maker->plans = plans;
    maker->scope = scope;
    maker->stand.name = str_scope;
    maker->stand.original = NULL;
    maker->stand.version = 0;
    maker->vectorcall = (vectorcallfunc)maker_vectorcall;
    PyObject_GC_Track(maker);
    return (PyObject *)maker;
}

static PyObject *
new_scope(ScopeMaker *maker, PyObject *values)
{
    ScopeCore *scope = (ScopeCore *)maker->scope->tp_alloc(maker->scope, 0);
    if (scope == NULL) {
        return NULL;
    }
    Py_INCREF(maker);
    Py_INCREF(values);
    scope->maker = maker;
    scope->values = values;
    scope->token = NULL;
    scope->exit_state = NULL;
    return (PyObject *)scope;
}

static PyObject *
maker_new(PyTypeObject *Py_UNUSED(type), PyObject *args, PyObject *kwargs)
{
    PyObject *bridge, *scope, *original = NULL;
    static char *names[] = {"bridge", "scope_type", "original", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO!|O:ScopeMaker", names, &bridge,
                                     &PyType_Type, &scope, &original)) {
        return NULL;
    }
    ScopeMaker *maker = (ScopeMaker *)new_maker(bridge, (PyTypeObject *)scope);
    if (maker != NULL && original != NULL && original != Py_None) {
        Py_INCREF(original);
        maker->stand.original = original;
    }
    return (PyObject *)maker;
}

/* bridge.scope(**values): a new scope of the values (keywords only), in a dict of its own. */
static PyObject *
maker_vectorcall(ScopeMaker *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    int holds = self->bridge == NULL ? -1 : stand_holds(&self->stand, self->bridge);
    if (holds <= 0) {
        return holds < 0 ? NULL : call_replacement(&self->stand, self->bridge, args, nargsf, kwnames);
    }
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (nargs != 0) {
        PyErr_SetString(PyExc_TypeError,
                        "scope() takes field values as keyword arguments only");
        return NULL;
    }
    PyObject *values = PyDict_New();
    if (values == NULL) {
        return NULL;
    }
    Py_ssize_t count = kwnames == NULL ? 0 : PyTuple_GET_SIZE(kwnames);
    for (Py_ssize_t i = 0; i < count; i++) {
        if (PyDict_SetItem(values, PyTuple_GET_ITEM(kwnames, i), args[i]) < 0) {
            Py_DECREF(values);
            return NULL;
        }
    }
    PyObject *scope = new_scope(self, values);
    Py_DECREF(values);
    return scope;
}

static int
maker_traverse(ScopeMaker *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(self));
    Py_VISIT(self->bridge);
    Py_VISIT(self->key);
    Py_VISIT(self->plans);
    Py_VISIT(self->scope);
    Py_VISIT(self->stand.original);
    return 0;
}

static int
maker_clear(ScopeMaker *self)
{
    Py_CLEAR(self->bridge);
    Py_CLEAR(self->key);
    Py_CLEAR(self->plans);
    Py_CLEAR(self->scope);
    Py_CLEAR(self->stand.original);
    return 0;
}

static void
maker_dealloc(ScopeMaker *self)
{
    PyTypeObject *type = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    maker_clear(self);
    type->tp_free((PyObject *)self);
    Py_DECREF(type);
}

/* __signature__ of the compiled bridge.scope and bridge.get, for inspect.signature(). */
static PyObject *
signature_of(PyObject *Py_UNUSED(self), void *closure)
{
    PyObject *signature = configured ? *(PyObject **)closure : Py_None;
    Py_INCREF(signature);
    return signature;
}

static PyGetSetDef maker_getset[] = {
    {"__signature__", signature_of, NULL, NULL, &config.scope_signature},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyGetSetDef getter_getset[] = {
    {"__signature__", signature_of, NULL, NULL, &config.get_signature},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMemberDef maker_members[] = {
    {"__vectorcalloffset__", T_PYSSIZET, offsetof(ScopeMaker, vectorcall), READONLY, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyType_Slot maker_slots[] = {
    {Py_tp_doc, "scope(**values): a scope setting the values (None unsets a field); see "
                "ContextBridge.scope."},
    {Py_tp_new, maker_new},
    {Py_tp_call, PyVectorcall_Call},
    {Py_tp_members, maker_members},
    {Py_tp_getset, maker_getset},
    {Py_tp_dealloc, maker_dealloc},
    {Py_tp_traverse, maker_traverse},
    {Py_tp_clear, maker_clear},
    {0, NULL},
};

static PyType_Spec maker_spec = {
    .name = "otel_ctxbridge._speedups.ScopeMaker",
    .basicsize = sizeof(ScopeMaker),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL |
             Py_TPFLAGS_IMMUTABLETYPE,
    .slots = maker_slots,
};

/* ScopeCore(bridge, values): the slower way in, for code that builds a Scope itself. */
static int
scope_init(ScopeCore *self, PyObject *args, PyObject *kwargs)
{
    PyObject *bridge, *values;
    static char *names[] = {"bridge", "values", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO:ScopeCore", names, &bridge, &values)) {
        return -1;
    }
    PyObject *maker = new_maker(bridge, Py_TYPE(self));
    if (maker == NULL) {
        return -1;
    }
    Py_INCREF(values);
    Py_XSETREF(self->maker, (ScopeMaker *)maker);
    Py_XSETREF(self->values, values);
    Py_CLEAR(self->token);
    Py_CLEAR(self->exit_state);
    return 0;
}

/* True when the scope is entered and not left. */
static int
scope_is_entered(ScopeCore *self)
{
    return self->token != NULL || (self->exit_state != NULL && self->exit_state->prev != NULL);
}

/* Entering. The context is attached in one of two ways:
 * - when __exit__ was looked up on the scope before entering (a `with` statement does so):
 *   the scope's baggage and state are exit_state (a ScopeState), which records the context to
 *   go back to and is what the block calls on leaving; an in-flight block holds nothing else
 *   (no scope, bound method or token). A scope entered this way and never left keeps the
 *   context from before it alive as long as its own context lives;
 * - otherwise (__enter__ called by hand, ExitStack, `async with`): a ContextVar token, which
 *   the scope keeps; a scope entered and never left then keeps no earlier context alive. */
static PyObject *
scope_enter(ScopeCore *self, PyObject *Py_UNUSED(ignored))
{
    if (!configured || self->maker == NULL || self->maker->key == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "this scope was not made by bridge.scope()");
        return NULL;
    }
    if (scope_is_entered(self)) {
        PyErr_SetString(PyExc_RuntimeError,
                        "this scope is already entered; call bridge.scope() again");
        return NULL;
    }
    if (self->values == NULL || self->values == Py_None) {
        PyErr_SetString(PyExc_RuntimeError, "a scope is entered once; call bridge.scope() again");
        return NULL;
    }
    PyObject *ctx = NULL, *new = NULL, *token = NULL, *span = NULL, *result = NULL;
    if (PyContextVar_Get(config.var, NULL, &ctx) < 0) {
        return NULL;
    }
    if (ctx == NULL) {
        PyErr_SetString(PyExc_LookupError, "OpenTelemetry's context variable has no value");
        return NULL;
    }
    ScopeMaker *maker = self->maker; /* held, with the values, while Python code may run */
    PyObject *values = self->values;
    ScopeState *exit_state = self->exit_state;
    Py_INCREF(maker);
    Py_INCREF(values);
    Py_XINCREF(exit_state);
    new = fast_derive(maker->key, maker->plans, ctx, values, NULL, exit_state);
    if (new == NULL && !PyErr_Occurred()) {
        PyObject *args[3] = {maker->bridge, ctx, values};
        new = PyObject_Vectorcall(config.derive, args, 3, NULL);
    }
    if (new == NULL) {
        goto done;
    }
    if (scope_is_entered(self)) { /* entered meanwhile (by a validator, say) */
        PyErr_SetString(PyExc_RuntimeError,
                        "this scope is already entered; call bridge.scope() again");
        goto done;
    }
    if (exit_state != NULL) {
        /* The way back is the context current now, as a token would record it: the code
         * that ran since the first read (a validator, a finalizer during a collection) may
         * have attached or left one. */
        PyObject *now = NULL;
        if (PyContextVar_Get(config.var, NULL, &now) < 0) {
            goto done;
        }
        Py_XSETREF(ctx, now);
        if (ctx == NULL) {
            PyErr_SetString(PyExc_LookupError, "OpenTelemetry's context variable has no value");
            goto done;
        }
    }
    token = PyContextVar_Set(config.var, new);
    if (token == NULL) {
        goto done;
    }
    if (exit_state != NULL) {
        Py_CLEAR(token);
        Py_INCREF(ctx);
        exit_state->prev = ctx;
        exit_state->entered_in = Py_XNewRef(PyThreadState_Get()->context);
    }
    else {
        self->token = token; /* the scope's from here */
        token = NULL;
    }
    Py_INCREF(Py_None);
    Py_SETREF(self->values, Py_None); /* an in-flight request keeps only the context alive */
    span = PyDict_Check(new) ? PyDict_GetItemWithError(new, config.span_key) : NULL;
    if (span == NULL && PyErr_Occurred()) {
        PyErr_Clear(); /* telemetry never throws: an odd context is not stamped */
    }
    if (span != NULL && span != Py_None) {
        PyObject *args[3] = {maker->bridge, span, values};
        PyObject *stamped = PyObject_Vectorcall(config.stamp, args, 3, NULL);
        if (stamped == NULL) { /* stamp() catches Exception: only BaseException lands here */
            HeldError held = hold_error(); /* the scope is not entered: detach, re-raise */
            PyObject *left;
            if (exit_state != NULL) {
                left = scope_state_leave(exit_state);
            }
            else {
                token = self->token;
                self->token = NULL;
                left = token == NULL || PyContextVar_Reset(config.var, token) == 0 ? Py_None : NULL;
                Py_XINCREF(left);
            }
            if (left == NULL) {
                PyErr_Clear();
            }
            Py_XDECREF(left);
            restore_error(held);
            goto done;
        }
        Py_DECREF(stamped);
    }
    Py_INCREF(self);
    result = (PyObject *)self;
done:
    Py_XDECREF(ctx);
    Py_XDECREF(new);
    Py_XDECREF(token);
    Py_DECREF(values);
    Py_DECREF(maker);
    Py_XDECREF(exit_state);
    return result;
}

/* Leaving: restore the context from before the scope (a no-op when not entered). */
static PyObject *
scope_leave(ScopeCore *self)
{
    PyObject *token = self->token;
    if (token == NULL) {
        return self->exit_state != NULL ? scope_state_leave(self->exit_state) : Py_NewRef(Py_None);
    }
    self->token = NULL;
    int failed = PyContextVar_Reset(config.var, token);
    Py_DECREF(token);
    if (failed < 0) {
        if (!PyErr_ExceptionMatches(PyExc_ValueError) &&
            !PyErr_ExceptionMatches(PyExc_RuntimeError)) {
            return NULL;
        }
        PyErr_Clear(); /* a token of another context: counted and logged, never raised */
        return PyObject_CallNoArgs(config.detach_failed);
    }
    Py_RETURN_NONE;
}

/* ScopeExit: ScopeCore.__exit__. Looked up on a scope that is not entered yet (a `with`
 * statement looks __exit__ up before calling __enter__), it gives the state the scope will
 * attach, which leaves the scope when called: the block then holds that one object. Looked
 * up on the class (contextlib.ExitStack), it is the function __exit__(scope, *exc_info). */
typedef struct {
    PyObject_HEAD
} ScopeExit;

static PyObject *
scope_exit_object(ScopeCore *scope, PyObject *descriptor)
{
    if (scope->exit_state == NULL && scope->token == NULL && configured &&
        scope->values != NULL && scope->values != Py_None) {
        scope->exit_state = (ScopeState *)new_scope_state();
        if (scope->exit_state == NULL) {
            return NULL;
        }
    }
    if (scope->exit_state != NULL) {
        Py_INCREF(scope->exit_state);
        return (PyObject *)scope->exit_state;
    }
    return PyMethod_New(descriptor, (PyObject *)scope);
}

static PyObject *
scope_exit_get(PyObject *self, PyObject *obj, PyObject *Py_UNUSED(type))
{
    if (obj == NULL || obj == Py_None) {
        Py_INCREF(self);
        return self;
    }
    if (!PyObject_TypeCheck(obj, scope_core_type)) {
        PyErr_SetString(PyExc_TypeError, "__exit__ applies to scopes");
        return NULL;
    }
    return scope_exit_object((ScopeCore *)obj, self);
}

static PyObject *
scope_exit_call(PyObject *Py_UNUSED(self), PyObject *args, PyObject *kwargs)
{
    if ((kwargs != NULL && PyDict_GET_SIZE(kwargs) != 0) || PyTuple_GET_SIZE(args) != 4 ||
        !PyObject_TypeCheck(PyTuple_GET_ITEM(args, 0), scope_core_type)) {
        PyErr_SetString(PyExc_TypeError,
                        "__exit__(scope, exc_type, exc, tb) takes a scope and 3 arguments");
        return NULL;
    }
    return scope_leave((ScopeCore *)PyTuple_GET_ITEM(args, 0));
}

static PyObject *
scope_exit_name(PyObject *Py_UNUSED(self), void *closure)
{
    return PyUnicode_FromString((const char *)closure);
}

static PyGetSetDef scope_exit_getset[] = {
    {"__name__", scope_exit_name, NULL, NULL, "__exit__"},
    {"__qualname__", scope_exit_name, NULL, NULL, "ScopeCore.__exit__"},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot scope_exit_slots[] = {
    {Py_tp_doc, "__exit__(exc_type, exc, tb): restore the context from before the scope."},
    {Py_tp_getset, scope_exit_getset},
    {Py_tp_descr_get, scope_exit_get},
    {Py_tp_call, scope_exit_call},
    {0, NULL},
};

static PyType_Spec scope_exit_spec = {
    .name = "otel_ctxbridge._speedups.ScopeExit",
    .basicsize = sizeof(ScopeExit),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE | Py_TPFLAGS_DISALLOW_INSTANTIATION,
    .slots = scope_exit_slots,
};

static PyObject *
scope_get_bridge(ScopeCore *self, void *Py_UNUSED(closure))
{
    if (self->maker == NULL) {
        Py_RETURN_NONE;
    }
    Py_INCREF(self->maker->bridge);
    return self->maker->bridge;
}

static int
scope_traverse(ScopeCore *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(self));
    Py_VISIT(self->maker);
    Py_VISIT(self->values);
    Py_VISIT(self->token);
    Py_VISIT(self->exit_state);
    return 0;
}

static int
scope_clear(ScopeCore *self)
{
    Py_CLEAR(self->maker);
    Py_CLEAR(self->values);
    Py_CLEAR(self->token);
    Py_CLEAR(self->exit_state);
    return 0;
}

static void
scope_dealloc(ScopeCore *self)
{
    PyTypeObject *type = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    scope_clear(self);
    type->tp_free((PyObject *)self);
    Py_DECREF(type);
}

static PyMethodDef scope_methods[] = {
    {"__enter__", (PyCFunction)scope_enter, METH_NOARGS,
     "Attach a context holding the values on top of the current one; return the scope."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef scope_members[] = {
    {"_values", T_OBJECT, offsetof(ScopeCore, values), READONLY,
     "The values to set; None once entered."},
    {"_token", T_OBJECT, offsetof(ScopeCore, token), READONLY,
     "The token of the attached context while entered outside a with block, else None."},
    {NULL, 0, 0, 0, NULL},
};

static PyGetSetDef scope_getset[] = {
    {"_bridge", (getter)scope_get_bridge, NULL, "The bridge of the scope.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot scope_slots[] = {
    {Py_tp_doc, "Entering and leaving a scope (compiled; see _scope.PyScopeCore)."},
    {Py_tp_new, PyType_GenericNew},
    {Py_tp_init, scope_init},
    {Py_tp_dealloc, scope_dealloc},
    {Py_tp_traverse, scope_traverse},
    {Py_tp_clear, scope_clear},
    {Py_tp_methods, scope_methods},
    {Py_tp_members, scope_members},
    {Py_tp_getset, scope_getset},
    {0, NULL},
};

static PyType_Spec scope_spec = {
    .name = "otel_ctxbridge._speedups.ScopeCore",
    .basicsize = sizeof(ScopeCore),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC |
             Py_TPFLAGS_IMMUTABLETYPE,
    .slots = scope_slots,
};
