"""EMULATED, not Slicer code: PythonQt's ``qt`` and ``ctk`` modules and the ``slicer.qMRML*`` widgets, as far as the
SACDiff panel and Slicer's own ``parameterNodeWrapper`` use them. Everything else in the panel tests is real:
MRML (``slicer-core``), ``parameterNodeWrapper``, ``ScriptedLoadableModule``, ``i18n`` and ``util`` (Slicer's own
sources at a release tag, ``../shared/slicer-python``), and the module's ``SACDiff.ui``, whose widget tree is built
from the file by ``QUiLoader`` below.

What the emulation promises, with the behaviour taken from Qt's, CTK's and Slicer's sources:

- Signals are attributes (``w.valueChanged.connect(slot)``) and PythonQt's ``w.connect("valueChanged(double)", slot)``;
  a slot taking fewer arguments than the signal gets the first ones (PythonQt does the same).
- Programmatic changes emit as in Qt/CTK: ``QComboBox`` emits ``currentIndexChanged`` when the index changes, also on
  ``clear()`` (→ −1) and on the first ``addItem`` (→ 0); ``QSpinBox.value``/``setRange`` emit ``valueChanged`` when
  the (clamped) value changes; ``ctkSliderWidget.value`` emits ``valueChanged`` whenever the value changes,
  whoever set it (``ctkSliderWidget.cpp``); ``valueIsChanging`` only while the user drags (``drag``);
  ``qMRMLNodeComboBox.setCurrentNode`` emits ``currentNodeChanged`` when the node changes; ``QCheckBox.checked``
  emits ``toggled`` and ``stateChanged``; ``ctkPathLineEdit.currentPath`` emits ``currentPathChanged``.
- An exception raised in a slot is caught and kept in ``SLOT_ERRORS`` (PythonQt prints it and carries on).
- ``QTimer`` does not run by itself: a test calls ``fire()`` for each timeout (``isActive`` tells whether it would).
- Dialogs are recorded, not shown (``DIALOGS``; a test sets ``CONFIRM`` for the answer of ``confirmOkCancelDisplay``).
"""

from __future__ import annotations

import inspect
import types
import xml.etree.ElementTree as ET
from pathlib import Path


SLOT_ERRORS: list = []  # exceptions raised in slots (PythonQt prints them; the event loop carries on)


class _BoundSignal:
    def __init__(self):
        self._slots = []

    def connect(self, slot):
        try:
            params = inspect.signature(slot).parameters.values()
            if any(p.kind is p.VAR_POSITIONAL for p in params):
                n = None
            else:
                n = sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
                        for p in params)
        except (TypeError, ValueError):
            n = None
        self._slots.append((slot, n))

    def disconnect(self, slot=None):
        self._slots = [] if slot is None else [(s, n) for s, n in self._slots if s != slot]

    def emit(self, *args):
        for slot, n in list(self._slots):
            try:
                slot(*(args if n is None else args[:n]))
            except Exception as exc:  # PythonQt prints a slot's exception to the console and goes on
                SLOT_ERRORS.append(exc)

    def __call__(self, *args):  # PythonQt: calling a signal emits it
        self.emit(*args)


class Signal:
    """A class attribute giving each instance its own bound signal."""

    def __set_name__(self, owner, name):
        self.name = name

    def __get__(self, obj, objtype=None):
        if obj is None:
            return self
        return obj.__dict__.setdefault("_signal_" + self.name, _BoundSignal())


class QObject:
    destroyed = Signal()

    def __init__(self, parent=None):
        self._children = []
        self._parent = None
        self._properties = {}
        self.name = ""
        if parent is not None:
            self.setParent(parent)

    def setParent(self, parent):
        self._parent = parent
        if parent is not None and self not in parent._children:
            parent._children.append(self)

    def parent(self):
        return self._parent

    def children(self):
        return list(self._children)

    @property
    def objectName(self):
        return self.name

    def setObjectName(self, name):
        self.name = name

    def setProperty(self, name, value):
        self._properties[name] = value

    def property(self, name):
        return self._properties.get(name)

    def findChildren(self, cls=None):
        found = []
        for child in self._children:
            if cls is None or isinstance(child, cls):
                found.append(child)
            found += child.findChildren(cls)
        return found

    def connect(self, signature, slot):  # PythonQt's string form
        getattr(self, signature.split("(")[0]).connect(slot)

    def disconnect(self, signature, slot=None):
        getattr(self, signature.split("(")[0]).disconnect(slot)

    def deleteLater(self):
        self.destroyed.emit()


class QWidget(QObject):
    def __init__(self, parent=None):
        super().__init__(parent)
        self.enabled = True
        self.visible = True
        self.toolTip = ""
        self._layout = None

    def isWidgetType(self):
        return True

    def setLayout(self, layout):
        self._layout = layout
        layout.setParent(self)

    def layout(self):
        return self._layout

    def show(self):
        self.visible = True

    def hide(self):
        self.visible = False

    def setMRMLScene(self, scene):  # qMRMLWidget's slot, propagated as Slicer's mrmlSceneChanged does
        for child in self.findChildren(QWidget):
            if hasattr(child, "_mrmlScene"):
                child.setMRMLScene(scene)


class QLayout(QObject):
    def addWidget(self, widget, *args):
        widget.setParent(self.parent() or self)

    def addRow(self, *items):
        for item in items:
            if isinstance(item, QWidget):
                self.addWidget(item)


class QVBoxLayout(QLayout):
    pass


class QHBoxLayout(QLayout):
    pass


class QFormLayout(QLayout):
    pass


class QLabel(QWidget):
    def __init__(self, text="", parent=None):
        super().__init__(parent)
        self.text = text


class QAbstractButton(QWidget):
    clicked = Signal()
    toggled = Signal()

    def __init__(self, text="", parent=None):
        super().__init__(parent)
        self.text = text
        self.checkable = False
        self._checked = False

    @property
    def checked(self):
        return self._checked

    @checked.setter
    def checked(self, value):
        value = bool(value)
        if value != self._checked:
            self._checked = value
            self.toggled.emit(value)
            self._state_changed(value)

    def _state_changed(self, value):
        pass

    def click(self):
        """The user clicks."""
        if self.checkable or isinstance(self, QCheckBox):
            self.checked = not self.checked
        self.clicked.emit(self.checked)


class QPushButton(QAbstractButton):
    pass


class QCheckBox(QAbstractButton):
    stateChanged = Signal()

    def _state_changed(self, value):
        self.stateChanged.emit(2 if value else 0)


class QComboBox(QWidget):
    currentIndexChanged = Signal()
    currentTextChanged = Signal()

    def __init__(self, parent=None):
        super().__init__(parent)
        self._items = []
        self._index = -1

    def addItem(self, text, *args):
        self._items.append(str(text))
        if self._index == -1:
            self.currentIndex = 0

    def addItems(self, texts):
        for t in texts:
            self.addItem(t)

    def clear(self):
        self._items = []
        self.currentIndex = -1

    def count(self):
        return len(self._items)

    def itemText(self, index):
        return self._items[index]

    def findText(self, text):
        return self._items.index(text) if text in self._items else -1

    @property
    def currentIndex(self):
        return self._index

    @currentIndex.setter
    def currentIndex(self, index):
        index = int(index) if -1 <= int(index) < len(self._items) else -1
        if index != self._index:
            self._index = index
            self.currentIndexChanged.emit(index)
            self.currentTextChanged.emit(self.currentText)

    def setCurrentIndex(self, index):
        self.currentIndex = index

    @property
    def currentText(self):
        return self._items[self._index] if self._index >= 0 else ""

    def choose(self, text):
        """The user picks an entry."""
        self.currentIndex = self._items.index(text)


class QSpinBox(QWidget):
    valueChanged = Signal()

    def __init__(self, parent=None):
        super().__init__(parent)
        self.minimum, self.maximum, self.singleStep = 0, 99, 1
        self._value = 0

    def setRange(self, lo, hi):
        self.minimum, self.maximum = lo, hi
        self.value = self._value

    def setMinimum(self, lo):
        self.setRange(lo, max(lo, self.maximum))

    def setMaximum(self, hi):
        self.setRange(min(self.minimum, hi), hi)

    @property
    def value(self):
        return self._value

    @value.setter
    def value(self, v):
        v = int(min(max(int(v), self.minimum), self.maximum))
        if v != self._value:
            self._value = v
            self.valueChanged.emit(v)

    def setValue(self, v):
        self.value = v


class QProgressBar(QWidget):
    def __init__(self, parent=None):
        super().__init__(parent)
        self.value, self.minimum, self.maximum = 0, 0, 100


class QPlainTextEdit(QWidget):
    def __init__(self, parent=None):
        super().__init__(parent)
        self.plainText = ""
        self.readOnly = False

    def appendPlainText(self, text):
        self.plainText += ("\n" if self.plainText else "") + text

    def clear(self):
        self.plainText = ""

    def toPlainText(self):
        return self.plainText


class QTimer(QObject):
    timeout = Signal()

    def __init__(self, parent=None):
        super().__init__(parent)
        self.interval = 0
        self.singleShotFlag = False
        self._active = False

    def setInterval(self, ms):
        self.interval = ms

    def start(self, ms=None):
        self._active = True

    def stop(self):
        self._active = False

    def isActive(self):
        return self._active

    def fire(self):
        """One timeout, as Qt's event loop would deliver while the timer is active."""
        if self._active:
            self.timeout.emit()

    @staticmethod
    def singleShot(ms, callback):
        callback()


class QSettings:
    STORE: dict = {}

    def value(self, key, default=None):
        return self.STORE.get(key, default)

    def setValue(self, key, value):
        self.STORE[key] = value

    def contains(self, key):
        return key in self.STORE


class QDir:
    @staticmethod
    def homePath():
        return str(Path.home())


class QFile:
    ReadOnly = 1

    def __init__(self, path):
        self.path = str(path)

    def exists(self):
        return Path(self.path).is_file()

    def open(self, mode):
        return True

    def close(self):
        pass


class QColor:
    def __init__(self, *args):
        self.args = args


class Qt:
    WaitCursor = 3


class QIcon:
    def __init__(self, path=""):
        self.path = str(path)


# ctk ---------------------------------------------------------------------------------------------------------------


class ctkCollapsibleButton(QAbstractButton):
    def __init__(self, parent=None):
        super().__init__("", parent)
        self.collapsed = False


class _TextProperty:
    """A string property that emits ``signal`` (the attribute name of a Signal) when its value changes, whoever sets
    it — as ctkPathLineEdit's currentPath and ctkDirectoryButton's directory do."""

    def __init__(self, signal: str):
        self.signal = signal

    def __set_name__(self, owner, name):
        self.key = "_" + name

    def __get__(self, obj, objtype=None):
        return self if obj is None else obj.__dict__.get(self.key, "")

    def __set__(self, obj, value):
        value = str(value)
        if value != obj.__dict__.get(self.key, ""):
            obj.__dict__[self.key] = value
            getattr(obj, self.signal).emit(value)


class ctkPathLineEdit(QWidget):
    currentPathChanged = Signal()
    currentPath = _TextProperty("currentPathChanged")
    Files, Dirs = 1, 2

    def __init__(self, parent=None):
        super().__init__(parent)
        self.filters = 0
        self.nameFilters = []
        self.settingKey = ""


class ctkDirectoryButton(QWidget):
    directoryChanged = Signal()
    directory = _TextProperty("directoryChanged")


class ctkSliderWidget(QWidget):
    """ctkSliderWidget.cpp: setValue emits valueChanged when the value changes, whoever set it; with tracking off a
    drag emits valueIsChanging while moving and valueChanged once on release."""

    valueChanged = Signal()
    valueIsChanging = Signal()

    def __init__(self, parent=None):
        super().__init__(parent)
        self.minimum, self.maximum, self.singleStep, self.decimals = 0.0, 99.0, 1.0, 2
        self.tracking = True
        self._value = 0.0

    @property
    def value(self):
        return self._value

    @value.setter
    def value(self, v):
        v = float(min(max(float(v), self.minimum), self.maximum))
        if v != self._value:
            self._value = v
            self.valueChanged.emit(v)

    def setValue(self, v):
        self.value = v

    def drag(self, *values):
        """The user drags the handle through ``values`` and releases it on the last one."""
        for v in values:
            self.valueIsChanging.emit(float(v))
            if self.tracking:
                self.value = v
        self.value = values[-1]


class _Placeholder(QWidget):
    """A CTK/Slicer widget class the panel does not use; present because Slicer's connectors compare types with it."""


def _placeholder(name):
    return type(name, (_Placeholder,), {})


# slicer.qMRML* ----------------------------------------------------------------------------------------------------


class qMRMLWidget(QWidget):
    mrmlSceneChanged = Signal()


class qMRMLNodeComboBox(QWidget):
    """qMRMLNodeComboBox: lists the scene's nodes of ``nodeTypes`` (subclasses included, minus ``hideChildNodeTypes``)."""

    currentNodeChanged = Signal()
    currentNodeIDChanged = Signal()

    def __init__(self, parent=None):
        super().__init__(parent)
        self.nodeTypes = []
        self.hideChildNodeTypes = []
        self.noneEnabled = False
        self.addEnabled = self.removeEnabled = self.renameEnabled = self.editEnabled = False
        self.showHidden = False
        self.showChildNodeTypes = True
        self.selectNodeUponCreation = True
        self._mrmlScene = None
        self._node = None

    def setMRMLScene(self, scene):
        """As qMRMLNodeComboBox: follows the scene's node added / removed events; without "None" in the list, the
        first listed node becomes current when there is none, and a removed current node is replaced."""
        if self._mrmlScene is not None:
            for tag in getattr(self, "_observers", ()):
                self._mrmlScene.RemoveObserver(tag)
        self._mrmlScene = scene
        self._observers = [] if scene is None else [
            scene.AddObserver(scene.NodeAddedEvent, lambda *a: self._refresh()),
            scene.AddObserver(scene.NodeRemovedEvent, lambda *a: self._refresh())]
        self._refresh()

    def _refresh(self):
        nodes = self.nodes()
        if self._node is not None and all(n is not self._node for n in nodes):
            self.setCurrentNode(None)
        if self._node is None and not self.noneEnabled and nodes:
            self.setCurrentNode(nodes[0])

    def mrmlScene(self):
        return self._mrmlScene

    def nodes(self):
        """What the user can pick from (qMRMLNodeComboBox's filter proxy)."""
        if self._mrmlScene is None:
            return []
        out = []
        for i in range(self._mrmlScene.GetNumberOfNodes()):
            node = self._mrmlScene.GetNthNode(i)
            if not any(node.IsA(t) for t in self.nodeTypes):
                continue
            if any(node.IsA(t) and node.GetClassName() != t for t in self.hideChildNodeTypes) or \
                    any(node.GetClassName() == t for t in self.hideChildNodeTypes):
                continue
            if not self.showHidden and node.GetHideFromEditors():
                continue
            out.append(node)
        return out

    def currentNode(self):
        return self._node

    def currentNodeID(self):
        return self._node.GetID() if self._node else ""

    def setCurrentNode(self, node):
        if node is not self._node:
            self._node = node
            self.currentNodeChanged.emit(node)
            self.currentNodeIDChanged.emit(node.GetID() if node else "")

    def setCurrentNodeID(self, node_id):
        self.setCurrentNode(self._mrmlScene.GetNodeByID(node_id) if node_id else None)


# the .ui loader ----------------------------------------------------------------------------------------------------


class QUiLoader:
    """Builds the widget tree of a Qt Designer file from its XML: one emulated widget per <widget>, its properties
    (including dynamic ones such as SlicerParameterName) set in file order as Qt's loader does."""

    def load(self, qfile, parent=None):
        root = ET.parse(qfile.path).getroot().find("widget")
        return self._widget(root, parent)

    def _widget(self, element, parent):
        cls = CLASSES[element.get("class")]
        widget = cls()
        if parent is not None:
            widget.setParent(parent)
        widget.name = element.get("name", "")
        for child in element:
            if child.tag == "property":
                self._set(widget, child)
            elif child.tag == "layout":
                self._layout(child, widget)
            elif child.tag == "widget":
                self._widget(child, widget)
        return widget

    def _layout(self, element, owner):
        layout = CLASSES[element.get("class")]()
        owner.setLayout(layout)
        for item in element.findall("item"):
            for child in item:
                if child.tag == "widget":
                    self._widget(child, owner)
                elif child.tag == "layout":
                    self._layout(child, owner)

    @staticmethod
    def _set(widget, prop):
        name = prop.get("name")
        value_el = list(prop)[0]
        text = value_el.text or ""
        if value_el.tag == "bool":
            value = text == "true"
        elif value_el.tag == "number":
            value = int(text)
        elif value_el.tag == "double":
            value = float(text)
        elif value_el.tag == "stringlist":
            value = [s.text or "" for s in value_el.findall("string")]
        elif value_el.tag == "set" or value_el.tag == "enum":
            value = text
        else:
            value = text
        if prop.get("stdset") == "0" or not hasattr(widget, name):
            widget.setProperty(name, value)
        else:
            setattr(widget, name, value)


CLASSES = {}


def install(slicer_module):
    """Put the emulated ``qt`` and ``ctk`` in ``sys.modules`` and the qMRML widgets on ``slicer``; returns
    (qt, ctk)."""
    import sys

    qt = types.ModuleType("qt")
    qt.__doc__ = "EMULATED PythonQt qt module (Testing/pythonqt_emulation.py)"
    for name, value in dict(globals()).items():
        if isinstance(value, type) and (name.startswith("Q") or name == "Qt"):
            setattr(qt, name, value)
    for name in ("QSlider", "QDoubleSpinBox", "QLineEdit", "QTextEdit", "QMenu", "QAction", "QToolButton",
                 "QSizePolicy", "QMessageBox", "QDialog", "QApplication"):
        setattr(qt, name, _placeholder(name))
    qt.Widget = QWidget
    ctk = types.ModuleType("ctk")
    ctk.__doc__ = "EMULATED CTK module (Testing/pythonqt_emulation.py)"
    for cls in (ctkCollapsibleButton, ctkPathLineEdit, ctkDirectoryButton, ctkSliderWidget):
        setattr(ctk, cls.__name__, cls)
    for name in ("ctkCheckBox", "ctkCheckablePushButton", "ctkDoubleSlider", "ctkComboBox", "ctkRangeWidget",
                 "ctkDoubleRangeSlider", "ctkColorPickerButton", "ctkDoubleSpinBox"):
        setattr(ctk, name, _placeholder(name))
    for cls in (qMRMLWidget, qMRMLNodeComboBox):
        setattr(slicer_module, cls.__name__, cls)
    for name in ("qMRMLSliderWidget", "qMRMLRangeWidget", "qMRMLSpinBox", "qSlicerWidget"):
        setattr(slicer_module, name, _placeholder(name))
    CLASSES.update({name: getattr(qt, name) for name in dir(qt) if name.startswith("Q")})
    CLASSES.update({name: getattr(ctk, name) for name in dir(ctk) if name.startswith("ctk")})
    CLASSES.update({"qMRMLWidget": qMRMLWidget, "qMRMLNodeComboBox": qMRMLNodeComboBox})
    sys.modules["qt"], sys.modules["ctk"] = qt, ctk
    return qt, ctk
